"""mtrec: multi-task CTR / conversion modelling on torchrec + FBGEMM."""

import logging

# torch warns once on torchrec import about fx tracing; it is not actionable for users
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.1.0"
