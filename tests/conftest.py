import os

from slurm_support import slurm_cluster  # noqa: F401 - a real SLURM cluster, started once per session
from tiny_run import tiny_run  # noqa: F401 - the tiny recipe trained in full, once per session

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
