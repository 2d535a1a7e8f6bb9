"""The console progress line: its content, its cadence, and the evaluation line."""

from scgpt_dist.callbacks import ProgressCallback

METRICS = {
    "loss": 31.25,
    "loss_gep": 15.9,
    "loss_gepc": 15.35,
    "lr": 0.003,
    "tokens_per_s": 36100.0,
    "data_wait_fraction": 0.012,
}


def test_progress_line_content_and_cadence(capfd, monkeypatch):
    clock = iter([0.0, 1.0, 5.0, 30.0, 31.0])  # constructor, then one reading per update
    monkeypatch.setattr("scgpt_dist.callbacks.time.perf_counter", lambda: next(clock))
    progress = ProgressCallback(total_steps=100, start_step=0, every_s=15.0)
    progress.update(20, METRICS)  # t=1: the first line always prints
    progress.update(40, METRICS)  # t=5: within 15 s of the last line, skipped
    progress.update(60, METRICS)  # t=30: prints
    progress.update(100, METRICS)  # t=31: the last step always prints
    lines = capfd.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "step 20/100 (20%)",
        "step 60/100 (60%)",
        "step 100/100 (100%)",
    ]
    assert lines[1] == (
        "step 60/100 (60%) | loss 31.25 (gep 15.9, gepc 15.35) | lr 3.0e-03 | 36.1k tok/s"
        " | data wait 1% | 0m30s, ETA 0m20s"
    )


def test_resumed_run_eta_counts_only_its_own_steps(capfd, monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr("scgpt_dist.callbacks.time.perf_counter", lambda: next(clock))
    ProgressCallback(total_steps=1000, start_step=900, every_s=0).update(950, METRICS)
    assert capfd.readouterr().out.strip().endswith("0m10s, ETA 0m10s")


def test_evaluation_line(capfd):
    ProgressCallback.evaluation(
        300,
        {
            "eval/gep_mse": 81.3,
            "eval/baseline_per_gene_mean": 113.8,
            "eval/baseline_per_gene_type_mean": 90.1,
            "eval/knn_type": 0.93,
            "eval/mean_cosine": 0.874,
        },
    )
    assert capfd.readouterr().out.strip() == (
        "eval step 300 | held-out GEP 81.3 (baselines: per_gene_mean 113.8, per_gene_type_mean 90.1)"
        " | kNN type 0.930 | mean cosine 0.874"
    )
