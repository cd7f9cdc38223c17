"""``tether`` on the command line under FSDP on CPU processes (gloo), which Accelerate 1.15
does not set up by itself: it turns an FSDP launch on a CPU into DDP. The patch below, for
tests only, makes the Accelerator an FSDP one after it is built (as it is on CUDA devices), so
that tether's FSDP paths run here. The FSDP settings come from the environment, as
``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets them.
"""

import contextlib
import sys

import accelerate
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from tether.cli import main

_built = accelerate.Accelerator.__init__


def _as_fsdp(self, *args, **kwargs):
    _built(self, *args, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
    for state in (self.state.__dict__, PartialState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
        state["device"] = torch.device("cpu")  # not cpu:<rank>, which FSDP takes for another device
    self.state.fsdp_plugin = plugin


accelerate.Accelerator.__init__ = _as_fsdp


# FSDP1 gathers a full state dict by moving each flat parameter to the CPU and freeing the
# device copy: with the compute device already the CPU, that frees the weights themselves.
from torch.distributed.fsdp._flat_param import FlatParamHandle  # noqa: E402

_to_cpu = FlatParamHandle.to_cpu


@contextlib.contextmanager
def _stay_on_cpu(self):
    if self.device.type == "cpu":
        yield
    else:
        with _to_cpu(self):
            yield


FlatParamHandle.to_cpu = _stay_on_cpu

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
