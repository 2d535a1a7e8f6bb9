"""`upload_dir`: a checkpoint's completion markers reach the storage after every other file."""

from pathlib import Path

from scgpt_dist.train import storage
from scgpt_dist.train.storage import resolve, upload_dir


def test_upload_dir_writes_markers_last_in_their_order(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "ds").mkdir(parents=True)
    for name in ("meta.json", "manifest_rank_0.json", "config.yaml", "ds/shard.pt"):
        (src / name).write_text(name)
    written = []
    put = storage._put_file

    def recording_put(path, dest, rel):
        written.append(Path(path).relative_to(src).as_posix())
        return put(path, dest, rel)

    monkeypatch.setattr(storage, "_put_file", recording_put)
    dest = resolve(tmp_path / "store") / "step_00000010"
    upload_dir(src, dest, last=("meta.json", "manifest_rank_0.json"))
    assert written[-2:] == ["meta.json", "manifest_rank_0.json"]
    assert sorted(written[:-2]) == ["config.yaml", "ds/shard.pt"]
    assert dest.file_sizes() == {name: len(name) for name in written}
