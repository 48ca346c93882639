"""training.allocator: freed CPU memory is reused, not page-faulted in again on every allocation."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from training.allocator import retain_freed_memory

    def cycle():  # a step's worth: 120 MiB of tensors alive together, written, then freed
        tensors = [torch.ones(n) for n in (16 * 2**20, 4 * 2**20, 2 * 2**20, 8 * 2**20)]
        del tensors

    def faults_per_cycle():
        for _ in range(5):  # warm up: the first cycles fault their pages in either way
            cycle()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            cycle()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

    default = faults_per_cycle()
    applied = retain_freed_memory()
    retained = faults_per_cycle()
    print(applied, default, retained)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    applied, default, retained = done.stdout.split()
    assert applied == "True"
    pages = 120 * 2**20 / 4096
    assert float(default) > 0.5 * pages  # glibc's default: a fresh mmap, every page faulted in
    assert float(retained) < 0.25 * pages  # 0 to 8% of them, seen here
