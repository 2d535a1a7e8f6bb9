"""`upload_dir`: a checkpoint's completion markers reach the storage after every other file."""

from pathlib import Path

import pyarrow.fs as pafs

from scgpt_dist.storage import resolve, upload_dir


def test_upload_dir_writes_markers_last_in_their_order(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "ds").mkdir(parents=True)
    for name in ("meta.json", "manifest_rank_0.json", "config.yaml", "ds/shard.pt"):
        (src / name).write_text(name)
    written = []
    copy = pafs.copy_files

    def recording_copy(source, destination, **kw):
        written.append(Path(source).relative_to(src).as_posix())
        return copy(source, destination, **kw)

    monkeypatch.setattr(pafs, "copy_files", recording_copy)
    dest = resolve(tmp_path / "store") / "step_00000010"
    upload_dir(src, dest, last=("meta.json", "manifest_rank_0.json"))
    assert written[-2:] == ["meta.json", "manifest_rank_0.json"]
    assert sorted(written[:-2]) == ["config.yaml", "ds/shard.pt"]
    assert dest.file_sizes() == {name: len(name) for name in written}
