"""`tools/gpu_check.sh` is valid bash, and its timing code runs (CPU dry run, conv4 at 32 px)."""

import importlib.util
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "gpu_check.sh")], check=True)


def test_throughput_dry_run_measures_every_configuration(capsys):
    path = os.path.join(ROOT, "tools", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.throughput(budget_s=600, steps=2, dry_run=True)
    results = re.findall(r"^RESULT (\S+) (\S+) (\S+) images/s", capsys.readouterr().out, re.M)
    assert {name for name, _, _ in results} == {
        "train_conv4_noxla_float32", "train_conv4_noxla_mixed_float16"}
    assert all(status == "pass" and float(rate) > 0 for _, status, rate in results), results
