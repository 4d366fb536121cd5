"""Result tables, paired t-tests (against scipy and a hand computation) and linear CKA properties."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from m2diff_monai.evaluation.cka import (
    ActivationRecorder,
    cka_matrix,
    collect_activations,
    linear_cka,
    save_cka_heatmap,
)
from m2diff_monai.evaluation.stats import paired_ttests, summary_table, to_markdown_table


@pytest.fixture
def results() -> pd.DataFrame:
    rows = []
    psnr = {"M2Diff": [30.0, 31.0, 29.5, 32.0], "IDDPM": [29.0, 30.5, 28.0, 31.0], "LD": [20.0, 22.0, 21.0, 19.0]}
    for method, values in psnr.items():
        for i, v in enumerate(values):
            rows.append({"subject": f"s{i}", "method": method, "psnr": v, "ssim": 0.9 + 0.01 * i})
    return pd.DataFrame(rows)


def test_paired_ttest_hand_computed_example():
    df = pd.DataFrame({"subject": list("abcabc"), "method": ["X"] * 3 + ["Y"] * 3, "m": [1.0, 2.0, 4.0, 0.0, 1.0, 1.0]})
    # differences 1, 1, 3: mean 5/3, sd = sqrt(((−2/3)²·2 + (4/3)²)/2) = sqrt(4/3), t = mean / (sd/√3) = 2.5
    out = paired_ttests(df, "m", reference="X")
    assert out.loc[0, "t"] == pytest.approx(2.5)
    assert out.loc[0, "mean_diff"] == pytest.approx(5 / 3)
    assert out.loc[0, "p"] == pytest.approx(2 * sps.t.sf(2.5, df=2))  # two-tailed, n − 1 = 2 dof


def test_paired_ttests_match_scipy(results):
    out = paired_ttests(results, "psnr", reference="M2Diff")
    assert list(out["method_b"]) == ["IDDPM", "LD"]
    for _, row in out.iterrows():
        a = results[results.method == "M2Diff"].sort_values("subject")["psnr"].to_numpy()
        b = results[results.method == row.method_b].sort_values("subject")["psnr"].to_numpy()
        ref = sps.ttest_rel(a, b)
        assert row.t == pytest.approx(ref.statistic) and row.p == pytest.approx(ref.pvalue)
        assert row.n == 4
    all_pairs = paired_ttests(results, "psnr")
    assert len(all_pairs) == 3
    # pairing is by subject, not row order
    shuffled = results.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(paired_ttests(shuffled, "psnr", reference="M2Diff"), out)
    # a missing subject drops that pair only
    partial = results.drop(results[(results.method == "LD") & (results.subject == "s0")].index)
    assert paired_ttests(partial, "psnr", reference="M2Diff").set_index("method_b").loc["LD", "n"] == 3
    with pytest.raises(ValueError, match="pair"):
        paired_ttests(pd.concat([results, results.iloc[:1]]), "psnr")


def test_summary_and_markdown(results):
    table = summary_table(results, ["psnr", "ssim"])
    assert list(table["method"]) == ["M2Diff", "IDDPM", "LD"]
    m2 = table.iloc[0]
    assert m2.psnr_mean == pytest.approx(30.625)
    assert m2.psnr_std == pytest.approx(np.std([30.0, 31.0, 29.5, 32.0], ddof=1))
    assert m2.psnr == f"{30.625:.4f} ± {m2.psnr_std:.4f}" and m2.n == 4
    md = to_markdown_table(
        summary_table(results, ["psnr", "ssim"], digits=2), ["method", "psnr", "ssim", "psnr_mean"], digits=2
    )
    lines = md.strip().splitlines()
    assert lines[0] == "| method | psnr | ssim | psnr_mean |"
    assert lines[1] == "| --- | --- | --- | ---: |"
    assert lines[2].startswith("| M2Diff | 30.62 ± 1.11 |") and lines[2].endswith("| 30.62 |")
    assert len(lines) == 5
    tests = paired_ttests(results, "psnr", reference="M2Diff")
    assert "| 2.10e-03 |" in to_markdown_table(tests, digits=2)  # the tiny LD p-value is written in e-notation


# ---------------------------------------------------------------- CKA


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 20))
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0)  # orthogonal transform and isotropic scaling
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)  # a constant shift is removed by centring
    independent = linear_cka(x, rng.standard_normal((64, 20)))
    assert independent < 0.45
    assert linear_cka(x, x * np.arange(1, 21)) < 0.999  # anisotropic scaling does change CKA
    # the Gram form equals the feature-space definition
    xc, yc = x - x.mean(0), (y := rng.standard_normal((64, 7))) - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(feature_form)
    assert math.isnan(linear_cka(np.ones((5, 3)), x[:5]))
    with pytest.raises(ValueError, match="number of examples"):
        linear_cka(x, x[:10])


def test_cka_matrix_hooks_and_heatmap(tmp_path):
    import torch
    from matplotlib.image import imread

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()
    )
    batches = [torch.randn(6, 1, 8, 8) for _ in range(2)]
    acts = collect_activations(model, ["0", "2"], lambda: [model(b) for b in batches])
    assert acts["0"].shape == (12, 4 * 8 * 8)
    pooled = collect_activations(model, ["0"], lambda: model(batches[0]), pool=2)
    assert pooled["0"].shape == (6, 4 * 2 * 2)
    matrix = cka_matrix([acts["0"], acts["2"]], [acts["0"], acts["2"]])
    assert matrix.shape == (2, 2)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix[0, 1] == pytest.approx(linear_cka(acts["0"], acts["2"]))
    with ActivationRecorder(model, ["0"]):
        pass
    assert not model[0]._forward_hooks  # hooks are removed on exit
    with pytest.raises(KeyError):
        ActivationRecorder(model, ["nope"]).__enter__()
    out = save_cka_heatmap(matrix, tmp_path / "cka.png", ["enc1", "enc2"], ["dec1", "dec2"], title="test")
    assert out.exists() and imread(out).ndim == 3
