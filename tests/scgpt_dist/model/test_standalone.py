"""The model package stands alone: on a machine with only torch (and numpy) installed, such as the GPU
machine the model benchmark runs on, it imports, trains a step and embeds cells. A subprocess blocks every
other heavy dependency, so an import of Ray, DeepSpeed, TileDB-SOMA, MLflow or even pyarrow fails here first."""

import subprocess
import sys

from tests.conftest import REPO

BLOCKED = (
    "ray", "deepspeed", "tiledbsoma", "tiledb", "mlflow", "pyarrow", "pandas", "anndata", "scipy",
    "sklearn", "yaml", "numba", "scanpy",
)  # fmt: skip

SCRIPT = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on a bare GPU machine")

sys.meta_path.insert(0, Block())

import torch
import jobs.bench.model  # the benchmark's module, as the GPU machine imports it
from scgpt_dist.model import ModelConfig, build_model
from scgpt_dist.model.collate import Batch, mask_values
from scgpt_dist.model.config import ObjectiveConfig
from scgpt_dist.model.losses import total_loss

cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, d_hid=16, n_batches=1)
model = build_model(cfg, 40, 0)
genes = torch.randint(3, 40, (4, 12))
genes[:, 0] = 1
values = torch.randint(0, 51, (4, 12)).float()
padding = torch.zeros(4, 12, dtype=torch.bool)
masked, mask = mask_values(values, 0.4, torch.Generator().manual_seed(0))
out = model(genes, masked, padding, torch.zeros(4, dtype=torch.long))
loss, parts = total_loss(out, values, mask, ObjectiveConfig())
loss.backward()
assert set(parts) == {{"gep", "gepc"}} and torch.isfinite(loss)
print("standalone ok", out["cell_emb"].shape)

# The benchmark's reference side too, when the reference scGPT's files are installed.
from data_ingest.vocab import GeneVocab
from scgpt_dist.model.reference import build_reference_model, load_reference_module
try:
    load_reference_module()
except ImportError:
    print("no reference scGPT")
else:
    args = {{"embsize": 16, "nheads": 2, "d_hid": 16, "nlayers": 1, "dropout": 0.0, "MVC": True}}
    ref = build_reference_model(args, GeneVocab.from_genes([f"G{{i}}" for i in range(37)]))
    print("reference ok", sum(p.numel() for p in ref.parameters()) > 0)
"""


def test_model_package_imports_and_trains_with_torch_alone():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "standalone ok torch.Size([4, 16])" in done.stdout
    assert "reference ok True" in done.stdout or "no reference scGPT" in done.stdout
