import sys

import pytest
import torch
from torch.nn import functional as F

from dashskip.data import load_text, token_windows
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration, calibrate
from dashskip.models.loading import fingerprint


def test_scales_and_cosines_match_hand_computed_values(model):
    samples = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, samples, fingerprint(model), batch_size=2, progress=False)
    with torch.no_grad():
        hidden = model(samples, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    for i in range(n - 1):  # transformers' last hidden state is after the final norm
        x, y = hidden[i].reshape(-1, 64), hidden[i + 1].reshape(-1, 64)
        assert cal.scales[i] == pytest.approx(float((y.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-5)
        assert cal.cosine[i] == pytest.approx(float(F.cosine_similarity(x, y, dim=-1).mean()), rel=1e-5, abs=1e-6)
        # the residual stream between the sublayers lies between input and output
        assert -1 <= cal.attn_cosine[i] <= 1 and -1 <= cal.mlp_cosine[i] <= 1
    assert cal.meta["tokens"] == 27 and len(cal.scales) == n


def test_save_load_plot_and_fingerprint_check(tmp_path, model):
    cal = calibrate(model, torch.randint(3, 97, (2, 6)), "abc", progress=False)
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again == cal
    again.check("abc")
    with pytest.raises(DashskipError, match="another model"):
        again.check("def")
    cal.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DashskipError, match="unreadable"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(DashskipError, match="not found"):
        Calibration.load(tmp_path / "missing.json")


def test_wikitext_is_read_from_the_shared_data_folder():
    text = load_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert len(text) > 1_000_000


def test_missing_data_set_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    import dashskip.data as data

    monkeypatch.setattr(data, "data_roots", lambda explicit=None: [tmp_path / "nowhere"])
    # no hub here: as if `datasets` were not installed (offline, it would retry the hub for ~20 s first)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DashskipError, match="not found; looked in: .*nowhere"):
        load_text("wikitext2")
    with pytest.raises(DashskipError, match="unknown data set"):
        load_text("imagenet")


def test_token_windows_refuse_too_little_data():
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.arange(len(text.split()))[None]}

    assert token_windows(Tok(), "a b c d e f", 3, 4).shape == (3, 4)
    with pytest.raises(DashskipError, match="fewer than one window"):
        token_windows(Tok(), "a b", 1, 4)


def test_windows_start_with_bos_where_the_tokenizer_does():
    from dashskip.eval.evaluation import perplexity_windows

    class Tok:
        bos_token_id = 1

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            ids = [10 + i for i in range(len(text.split()))]
            if add_special_tokens and self.adds_bos:
                ids = [1] + ids
            return {"input_ids": torch.tensor([ids]) if return_tensors else ids}

    text = " ".join(["w"] * 20)
    with_bos = token_windows(Tok(True), text, 2, 5)
    assert with_bos.shape == (2, 5) and with_bos[:, 0].eq(1).all() and with_bos[:, 1:].ge(10).all()
    assert token_windows(Tok(False), text, 2, 5).ge(10).all()
    windows = perplexity_windows(Tok(True), text, 5)
    assert windows.shape == (5, 5) and windows[:, 0].eq(1).all()
    assert windows[:, 1:].reshape(-1).tolist() == list(range(10, 30))  # every text token scored once
    assert perplexity_windows(Tok(False), text, 5).reshape(-1).tolist() == list(range(10, 30))
