"""Weight-update coverage (spec §8.4), measured on the layers' own merges: BS touches every entry twice per
merge, FS touches its subsets only — uniformly at random — and the structural count matches the entries
whose values really changed."""

import jax
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import coverage, fs

MERGES = 100  # the spec's toy: 100 inner loops of one step (T_m = 1)


def _layer(n, m, **cfg):
    return pj.POETLinear(n, m, config=pj.POETConfig(**cfg), rngs=nnx.Rngs(0))


def _np(cov):
    return coverage.Coverage(*(np.asarray(a) for a in cov))


def test_bs_touches_every_entry_twice_per_merge():
    cov = _np(coverage.coverage_run(_layer(64, 64, block_size=8), MERGES, jax.random.key(0)))
    np.testing.assert_array_equal(cov.touches, 2 * MERGES)  # the spec's 200 for 100 merges, every entry
    np.testing.assert_array_equal(cov.touched, MERGES)
    np.testing.assert_array_equal(cov.changed, cov.touched)  # and every entry really changed every time


def test_bs_ragged_single_coordinate_block_is_never_rotated():
    # 17 = 8 + 8 + 1: each merge, whichever input coordinate lands in the 1×1 tail block stays put.
    cov = _np(coverage.coverage_run(_layer(17, 20, block_size=8), 40, jax.random.key(1)))
    assert cov.rows.sum() == 40 * 16  # exactly one of the 17 rows missed per merge
    np.testing.assert_array_equal(cov.cols, 40)  # 20 = 8 + 8 + 4: all rotated
    np.testing.assert_array_equal(cov.changed, cov.touched)


@pytest.mark.parametrize("n,m,block_size", [(128, 96, 0.25), (64, 64, 0.5)])
def test_fs_coverage_is_uneven_with_the_expected_mean(n, m, block_size):
    lay = _layer(n, m, family="fs", block_size=block_size)
    ki, ko = lay.layout_in.size, lay.layout_out.size
    cov = _np(coverage.coverage_run(lay, MERGES, jax.random.key(2)))
    np.testing.assert_array_equal(cov.touches, cov.rows[:, None] + cov.cols[None, :])
    np.testing.assert_array_equal(cov.changed, cov.touched)  # structural count == entries that changed
    # Every merge rotates exactly Ki rows and Ko columns, so the mean over entries is exact:
    assert cov.rows.sum() == MERGES * ki and cov.cols.sum() == MERGES * ko
    np.testing.assert_allclose(cov.touches.mean(), MERGES * (ki / n + ko / m), rtol=1e-12)
    assert cov.touches.max() < 2 * MERGES  # no entry is touched every time, unlike BS

    # Uniformity. With fresh uniform subsets, a row's count is Binomial(MERGES, p = Ki/N) (columns:
    # q = Ko/M). (a) Every count lies within 5σ of its mean: a correct sampler fails this with probability
    # < (N+M)·5.7e-7 ≈ 1e-4; a fixed or biased subset (counts near 0 or MERGES) fails it.
    # (b) Since the mean is exact, E[mean((r − MERGES·p)²)] = MERGES·p(1−p) exactly; the estimate's relative
    # sd is ≈ √(2/N) (binomial ≈ normal at MERGES = 100), so ±5√(2/N) is again a ≲1e-6 event for a correct
    # sampler, while a deterministic rotation through the coordinates (too even) or a sampler that favours
    # some coordinates (too spread) falls outside.
    for counts, p, d in ((cov.rows, ki / n, n), (cov.cols, ko / m, m)):
        var = MERGES * p * (1 - p)
        assert np.all(np.abs(counts - MERGES * p) <= 5 * np.sqrt(var)), counts
        ratio = np.mean((counts - MERGES * p) ** 2) / var
        assert abs(ratio - 1) <= 5 * np.sqrt(2 / d), ratio


def test_touched_rows_and_cols_are_the_fs_subsets():
    lay = _layer(40, 30, family="fs", block_size=0.25)
    s_in, s_out = fs.index_subsets(lay.perms, lay.layout_in.size, lay.layout_out.size)
    rows = np.zeros(40, bool)
    rows[np.asarray(s_in)] = True
    cols = np.zeros(30, bool)
    cols[np.asarray(s_out)] = True
    np.testing.assert_array_equal(np.asarray(coverage.touched_rows(lay)), rows)
    np.testing.assert_array_equal(np.asarray(coverage.touched_cols(lay)), cols)
    np.testing.assert_array_equal(np.asarray(coverage.touch_counts(lay)),
                                  rows[:, None].astype(int) + cols[None, :].astype(int))


def test_coverage_run_leaves_the_layer_alone_and_checks_arguments():
    lay = _layer(16, 12, family="fs", block_size=0.5)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lay)))
    coverage.coverage_run(lay, 3, jax.random.key(0))
    after = nnx.to_pure_dict(nnx.state(lay))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, after)
    with pytest.raises(ValueError, match="num_merges=0"):
        coverage.coverage_run(lay, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="theta_scale=0.0"):
        coverage.coverage_run(lay, 3, jax.random.key(0), theta_scale=0.0)


def test_coverage_plot_script_writes_a_png(tmp_path, monkeypatch, capsys):
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("coverage_plot", os.path.join(root, "benchmarks", "coverage_plot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cov.png"
    monkeypatch.setattr(sys, "argv", ["coverage_plot.py", "--dim", "16", "--merges", "4", "--out", str(out)])
    mod.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| POET-BS b=8 | 112 | 8 | 8 | 8.00 | 0.00 | 100.0% |" in table  # BS: every entry 2·4 times
