"""Scale ablation: pretrain a grid of model sizes (N) x pretraining cell counts (D), plus an organ-restricted
context arm, evaluate every model downstream, and fit L(N, D) = E + A/N^alpha + B/D^beta.

    python -m jobs.scale_ablation --config jobs/configs/scale_ablation_cpu.yaml [key.sub=value ...]
    python -m jobs.scale_ablation --config ... --report-only      # refit / replot finished cells

Every grid cell is one cell of a `jobs.sweep` (a Ray task; resumable, keyed by a hash of its parameters; its
pretraining run is an MLflow child of the ablation's parent run). A cell:

1. pretrains with `run_pretraining` (Ray Train + DeepSpeed) on D cells of the source: the cells whose
   split hash puts them outside a held-out fraction chosen so that ~D cells remain. Held-out sets nest, so
   every cell's training set excludes the same evaluation cells (`eval.holdout_fraction`), and a smaller D is
   a subset of a larger one;
2. evaluates the consolidated model on those evaluation cells: held-out GEP MSE (masked-value regression, next
   to the per-gene-mean baseline), kNN cell-type accuracy of its zero-shot `<cls>` embeddings, and the same two
   on the context tissue's evaluation cells; optionally a `jobs.finetune` task on the model;
3. logs N (non-embedding parameters), D (training cells), tokens seen and compute (6 N tokens) with the
   metrics to its MLflow run.

The driver then reads every cell's metrics back from MLflow (child runs of the parent), fits the scaling law
on the whole-census cells with bootstrap CIs (`jobs.scaling_law`), and writes a report: the table, the fit,
loss vs compute, downstream accuracy vs D, and the context arm next to the whole-census model of the same N
and D.

Nesting: a cell is a Ray task that itself runs a TorchTrainer, whose workers and read tasks reserve their own
CPUs. The cell's task reserves `num_cpus` (default 0) so it never holds a CPU the trainer it starts needs;
on a 2-core machine run one cell at a time (`concurrency: 1`).
"""
