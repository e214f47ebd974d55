import os
import sys

import torch

# Tests import the flat modules (data, common, lovt, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
