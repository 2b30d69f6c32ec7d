import numpy as np
import pytest
from PIL import Image

from hieratok.report import ema_smooth, plot_loss_curves, plot_per_scale_metric, plot_tsne, plots, read_csv_log

CSV = """step,loss,l1,kl,lr,phase
0,1.0,0.50,,0.0,train
10,0.8,0.40,1e-6,1e-4,train
20,0.5,0.30,,1e-4,train
30,0.4,0.25,2e-6,5e-5,train
"""


@pytest.fixture
def log_csv(tmp_path):
    p = tmp_path / "train_log.csv"
    p.write_text(CSV)
    return p


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, to check what they drew (not only that a PNG exists)."""
    saved = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or save(fig, path))
    return saved


def _lines(ax):
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]


def _is_png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_read_csv_log(log_csv):
    cols = read_csv_log(log_csv)
    assert list(cols) == ["step", "loss", "l1", "kl", "lr"]  # string column dropped
    np.testing.assert_array_equal(cols["step"], [0, 10, 20, 30])
    assert np.isnan(cols["kl"][0]) and cols["kl"][3] == 2e-6


def test_ema_smooth_matches_closed_form():
    v = np.array([1.0, 3.0, 2.0, 5.0])
    w = 0.7
    # debiased EMA: sum_i (1-w) w^(t-i) v_i / (1 - w^(t+1))
    ref = [sum((1 - w) * w ** (t - i) * v[i] for i in range(t + 1)) / (1 - w ** (t + 1)) for t in range(4)]
    np.testing.assert_allclose(ema_smooth(v, w), ref, rtol=1e-12)
    np.testing.assert_array_equal(ema_smooth(v, 0.0), v)
    with pytest.raises(ValueError, match="smooth"):
        ema_smooth(v, 1.0)


def test_loss_curves_png(log_csv, tmp_path, figures):
    out = plot_loss_curves(log_csv, tmp_path / "loss.png", keys=["loss", "lr"], log_y={"lr"})
    assert _is_png(out)
    loss_ax, lr_ax = figures[0].axes
    (_, x, raw), (label, x2, smooth) = _lines(loss_ax)
    assert x == x2 == [0, 10, 20, 30] and raw == [1.0, 0.8, 0.5, 0.4] and label == "train_log"
    np.testing.assert_allclose(smooth, ema_smooth(np.array(raw), 0.6))
    assert lr_ax.get_yscale() == "log" and lr_ax.get_title() == "lr"
    assert _lines(lr_ax)[0][1:] == ([10, 20, 30], [1e-4, 1e-4, 5e-5])  # lr = 0 cannot go on a log axis
    # several runs overlaid, including an already loaded dict of columns
    other = {"step": [0, 10, 20], "loss": [1.2, 0.9, 0.7], "l1": [0.6, 0.5, 0.4], "kl": [0, 0, 0], "lr": [0, 1, 1]}
    out2 = plot_loss_curves({"multi": log_csv, "single": other}, tmp_path / "sub" / "overlay.png", smooth=0.5)
    assert _is_png(out2)
    assert Image.open(out2).size[0] > Image.open(out).size[0]  # 4 panels in 3 columns vs 2 panels
    panels = [ax for ax in figures[1].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss", "l1", "kl", "lr"]
    kl = _lines(panels[2])
    assert kl[0][1:] == ([10, 30], [1e-6, 2e-6]) and kl[2][1:] == ([0, 10, 20], [0, 0, 0])  # NaN cells skipped
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["multi", "single"]


def test_loss_curves_missing_column_is_a_clear_error(log_csv, tmp_path):
    with pytest.raises(ValueError, match=r"'perceptual'.*not in the log of run 'train_log'.*available: loss"):
        plot_loss_curves(log_csv, tmp_path / "x.png", keys=["loss", "perceptual"])
    with pytest.raises(ValueError, match="no 'step' column"):
        plot_loss_curves({"r": {"loss": [1.0, 2.0]}}, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_loss_curves(tmp_path / "nope.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_tsne_and_per_scale_plots(tmp_path, figures, caplog):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 2))
    dens = np.exp(-(pts ** 2).sum(1))
    assert _is_png(plot_tsne(pts, dens, tmp_path / "t.png", title="multi-scale"))
    scatter = figures[0].axes[0].collections[0]
    order = np.argsort(dens)  # densest drawn last
    np.testing.assert_array_equal(scatter.get_offsets(), pts[order])
    np.testing.assert_array_equal(scatter.get_array(), dens[order])
    with pytest.raises(ValueError, match="density"):
        plot_tsne(pts, dens[:-1], tmp_path / "t2.png")
    out = plot_per_scale_metric({"multi": [18.0, 20.0, None, 24.0], "single": {64: 24.4}}, [8, 16, 32, 64],
                                tmp_path / "psnr.png", ylabel="PSNR (dB)")
    assert _is_png(out)
    nan = [list(np.isnan(y)) for _, _, y in _lines(figures[1].axes[0])]
    assert [(label, x) for label, x, _ in _lines(figures[1].axes[0])] == [("multi", [8, 16, 32, 64]),
                                                                       ("single", [8, 16, 32, 64])]
    assert nan == [[False, False, True, False], [True, True, True, False]]
    # scale keys as read back from JSON are strings
    plot_per_scale_metric({"run": {"8": 20.0, "16": 22.0}}, [8, 16], tmp_path / "json.png", ylabel="PSNR")
    assert _lines(figures[2].axes[0]) == [("run", [8, 16], [20.0, 22.0])]
    with pytest.raises(ValueError, match="integer sizes"):
        plot_per_scale_metric({"run": {"8.5": 20.0}}, [8, 16], tmp_path / "bad.png", ylabel="PSNR")
    plot_per_scale_metric({"run": {"8": None}}, [8, 16], tmp_path / "empty.png", ylabel="PSNR")
    assert "no finite value" in caplog.text
    with pytest.raises(ValueError, match="3 values for 4 scales"):
        plot_per_scale_metric({"multi": [1, 2, 3]}, [8, 16, 32, 64], tmp_path / "bad.png", ylabel="PSNR")
