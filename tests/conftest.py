import os
import shutil
import sys

import pytest
import torch

# Tests import the flat modules (data, common, lovt, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, for _free_the_disk."""
    report = (yield).get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(autouse=True)
def _free_the_disk(request):
    """Training runs write checkpoints of hundreds of MB (a ViT-B paper-preset step about 1.5 GB): a passed test's
    tmp_path is deleted when it ends, so the suite needs a few GB of disk instead of tens (pytest keeps every test's
    folder of its last three sessions). A failed test's folder stays for a look."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed and "tmp_path" in request.fixturenames:
        shutil.rmtree(request.node.funcargs["tmp_path"], ignore_errors=True)
