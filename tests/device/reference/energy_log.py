"""The independent energy log: a GPU's cumulative energy counter, read by its own process.

    python3 energy_log.py OUT [--index 0] [--interval-ms 20] [--lib libnvidia-ml.so.1]
    python3 energy_log.py OUT --cpu-proxy      (dry run without a GPU: see below)

One line per read: `t0_ns t1_ns mj` (CLOCK_MONOTONIC before and after the read, the counter in
millijoules), flushed each time; stops on SIGTERM/SIGINT. It talks to the driver's library
through ctypes (no tracer code, no Python NVML binding) so nothing of tracer's sampling is
shared with the reference. `--cpu-proxy` writes the host's busy CPU time times 50 W instead, so
a dry run on a machine without a GPU exercises the same file and analysis (its numbers mean
nothing).
"""

import argparse
import ctypes
import os
import signal
import time

stop = False


def on_signal(*_):
    global stop
    stop = True


def nvml_reader(lib, index):
    nv = ctypes.CDLL(lib)
    if nv.nvmlInit_v2() != 0:
        raise SystemExit("nvmlInit_v2 failed")
    h = ctypes.c_void_p()
    rc = nv.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(h))
    if rc != 0:
        raise SystemExit(f"nvmlDeviceGetHandleByIndex_v2({index}) = {rc}")
    e = ctypes.c_ulonglong()

    def read():
        rc = nv.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(e))
        if rc != 0:
            raise SystemExit(f"nvmlDeviceGetTotalEnergyConsumption = {rc}")
        return e.value
    return read


def cpu_proxy_reader():
    hz = os.sysconf("SC_CLK_TCK")

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - v[4]
        return busy * 50_000 // hz
    return read


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--lib", default="libnvidia-ml.so.1")
    ap.add_argument("--cpu-proxy", action="store_true")
    a = ap.parse_args()
    read = cpu_proxy_reader() if a.cpu_proxy else nvml_reader(a.lib, a.index)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    period = a.interval_ms * 1e6
    with open(a.out, "w") as f:
        f.write(f"# source {'cpu-proxy' if a.cpu_proxy else 'nvml'} index {a.index}\n")
        nxt = time.monotonic_ns()
        while not stop:
            t0 = time.monotonic_ns()
            mj = read()
            t1 = time.monotonic_ns()
            f.write(f"{t0} {t1} {mj}\n")
            f.flush()
            nxt += period
            time.sleep(max(0.0, (nxt - time.monotonic_ns()) / 1e9))


if __name__ == "__main__":
    main()
