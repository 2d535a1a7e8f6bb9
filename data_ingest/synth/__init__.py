"""Synthetic data whose right answers are known: the census generator and its planted truth (`census`,
`python -m data_ingest.synth`), a small AnnData with planted marker programs (`small`), an independent
simulator (`splat`, the Splat model), perturbation screens (`perturb`) and CITE-seq-like RNA + protein
(`multiome`) built on a census's truth."""
