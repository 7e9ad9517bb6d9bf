"""Peak memory of ``anymc3d info`` on two hostile plugins: a 1 MB zip whose weights member deflates to 1 GiB of
zeros, and a plugin.json nested 100000 levels deep. Each runs in its own process; the peak resident memory of that
process and its exit status, stderr line count and last line are printed.

    python benchmarks/bench_hostile_plugins.py DEMO_PLUGIN [OUT_FOLDER]

(``DEMO_PLUGIN``: the ``plugin.anymc3d`` of ``anymc3d demo``, whose metadata and weights the hostile files reuse.)
"""
import subprocess
import sys
from pathlib import Path

from anymc3d.plugin_file import read_members
from anymc3d.testing import write_plugin_zip


def peak_of(command):
    """Exit status, stderr and peak RSS (MB) of ``command`` run alone in a child (a fresh child per call)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
             "print(p.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024);"
             "print(p.stderr.strip())")
    lines = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True).stdout.splitlines()
    return int(lines[0]), int(lines[1]), lines[2:]


def main():
    demo, out = Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else ".")
    raw, weights = read_members(demo)
    files = {"zip bomb (1 GiB deflated)": write_plugin_zip(out / "bomb.anymc3d", raw, inflated_size=1024 ** 3),
             "plugin.json nested 100000 deep": write_plugin_zip(
                 out / "nested.anymc3d", b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", weights)}
    baseline = peak_of([sys.executable, "-m", "anymc3d", "info", str(demo)])
    print(f"anymc3d info on the demo plugin: exit {baseline[0]}, peak RSS {baseline[1]} MB")
    for name, path in files.items():
        code, peak, stderr = peak_of([sys.executable, "-m", "anymc3d", "info", str(path)])
        print(f"{name} ({path.stat().st_size} bytes): exit {code}, peak RSS {peak} MB, {len(stderr)} stderr lines: "
              f"{stderr[-1][:160] if stderr else ''}")


if __name__ == "__main__":
    main()
