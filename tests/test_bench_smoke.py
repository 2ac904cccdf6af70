"""The ops benchmark runs (quick, on the CPU) and its kernels equal the reference: it calls package
internals (the LRN's band), which a change left it behind once (AttributeError: 'band')."""

from bench import bench_ops


def test_the_ops_benchmark_runs_and_every_kernel_equals_the_reference(tmp_path, capsys):
    result = bench_ops.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    ops = {row["op"] for row in result["rows"]}
    assert {"lrn_forward_backward", "mask_replicas", "as_pixel_codes"} <= ops
    assert all(row["equal_to_reference"] for row in result["rows"]), result["rows"]
