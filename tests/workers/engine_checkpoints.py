"""``tether`` on the command line with checkpoints in the ``engine`` format under DDP.

DeepSpeed and FSDP checkpoints are every process's shards written through Accelerate's state
saving (``Parallel.write_checkpoint``); those engines need CUDA, but under DDP on a CPU the same
path writes and reads Accelerate's state of whole models, so tests run it here.
"""

import sys

from tether.cli import main
from tether.trainers.parallel import Parallel

Parallel.checkpoint_format = property(lambda self: "plain" if self.accelerator is None else "engine")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
