"""Trust checks: cascading randomisation (Spearman + SSIM), deletion/insertion, mask agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _explain_models import TinyCNN, trained_blob_model
from torch import nn

from medtl.errors import ConfigError, DataError
from medtl.explain._stages import cascade_stages
from medtl.explain.attribution import explain
from medtl.explain.faithfulness import deletion_insertion, summarize_faithfulness
from medtl.explain.sanity import mask_agreement, randomization_check, ssim


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def blob_model():
    return trained_blob_model()


def test_cascade_stages_run_top_down_with_the_classifier_first() -> None:
    stages = cascade_stages(TinyCNN())
    names = [n for n, _ in stages]
    assert names == ["classifier_layer", "feature_layer.0", "stem.0"]
    # the BatchNorm after the stem conv is randomised together with it
    assert [type(m).__name__ for m in stages[2][1]] == ["Conv2d", "BatchNorm2d"]


def test_cascading_randomisation_passes_on_a_trained_model(blob_model) -> None:
    model, x, y, _ = blob_model
    positives = x[y == 1][:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = randomization_check(model, positives, 1, "gradcam", max_steps=3)
    assert [s["randomized"] for s in result["steps"]] == ["classifier_layer", "feature_layer.0",
                                                          "stem.0"]
    for step in result["steps"]:
        assert len(step["spearman"]) == len(step["ssim"]) == 4
        assert step["mean_ssim"] is None or -1 <= step["mean_ssim"] <= 1
    assert result["passed"] is True, result
    assert result["mean_abs_spearman"] < result["threshold"]
    assert result["verdict"].startswith("passed")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original left untouched
    # the same seed gives the same result
    again = randomization_check(model, positives, 1, "gradcam", max_steps=3)
    assert again["steps"][-1]["spearman"] == result["steps"][-1]["spearman"]


def test_randomisation_flags_weight_independent_maps() -> None:
    """A 'method' that returns the image itself never changes: it must be flagged."""

    class PositiveHead(nn.Linear):
        def reset_parameters(self) -> None:
            nn.init.uniform_(self.weight, 0.5, 1.0)
            nn.init.zeros_(self.bias)

    # one feature channel, positive head: Grad-CAM is relu(A), whatever the head's weights
    model = TinyCNN(feature_channels=1)
    model.classifier_layer = PositiveHead(1, 2)
    result = randomization_check(model, torch.rand(3, 1, 16, 16), 0, "gradcam", max_steps=2)
    head = result["steps"][0]
    assert head["randomized"] == "classifier_layer"
    assert all(r > 0.99 for r in head["spearman"])
    assert all(s > 0.99 for s in head["ssim"])


def test_randomisation_flags_input_driven_method() -> None:
    """Occlusion of a model whose output is the mean intensity ignores the weights' values."""

    class MeanModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Linear(1, 2)
            with torch.no_grad():
                self.scale.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.classifier_layer = self.scale

        def forward(self, x):
            return self.scale(x.flatten(1).mean(1, keepdim=True))

    x = torch.rand(2, 1, 12, 12)
    res = randomization_check(MeanModel(), x, 0, "ig", max_steps=2, n_steps=8)
    # IG of a linear mean is x / N scaled by the weight: randomising the weight keeps the ranks
    assert res["passed"] is False and res["verdict"].startswith("FAILED")


def test_randomisation_arguments() -> None:
    model, x = TinyCNN(), torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="'max_steps' parameter of randomization_check must be an int >= 2"):
        randomization_check(model, x, max_steps=1)
    with pytest.raises(ConfigError, match="must be a submodule of the model"):
        randomization_check(model, x, layer=nn.Conv2d(1, 1, 3))
    result = randomization_check(model, x, 0, layer=model.feature_layer[0], max_steps=2)
    assert len(result["spearman"]) == 2


def test_ssim_identical_and_unrelated_maps() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((20, 20))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, rng.random((20, 20))) < 0.3
    assert ssim(np.zeros((20, 20)), a) is None
    assert ssim(rng.random((5, 8, 8)), rng.random((5, 8, 8))) < 0.5  # 3D works


@pytest.mark.parametrize("dims", [2, 3])
def test_deletion_insertion_beat_random_for_a_faithful_map(dims: int) -> None:
    model, x, y, masks = trained_blob_model(dims=dims, size=24 if dims == 2 else 12,
                                            n=64 if dims == 2 else 32)
    pos = torch.nonzero(y == 1).flatten()[:3]
    xs = x[pos]
    truth = masks[pos].float() + 0.01 * torch.rand(masks[pos].shape)  # the blob ranked first
    rows = deletion_insertion(model, xs, truth, 1, n_steps=8, blur_sigma=3.0)
    assert len(rows) == 3 and len(rows[0]["deletion"]) == 9
    summary = summarize_faithfulness(rows)
    assert summary["deletion_better_than_random"] and summary["insertion_better_than_random"]
    assert summary["deletion_auc"] < summary["random_deletion_auc"]
    # the curves start at the unperturbed probability
    with torch.no_grad():
        p = torch.softmax(model(xs), 1)[:, 1]
    assert rows[0]["deletion"][0] == pytest.approx(float(p[0]), abs=1e-5)
    assert rows[0]["insertion"][-1] == pytest.approx(float(p[0]), abs=1e-5)


def test_deletion_insertion_validates_shapes() -> None:
    with pytest.raises(ConfigError, match=r"'maps' parameter of deletion_insertion must have shape"):
        deletion_insertion(TinyCNN(), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    maps = explain(TinyCNN(), torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="'n_steps' parameter of deletion_insertion"):
        deletion_insertion(TinyCNN(), torch.rand(2, 1, 8, 8), maps, n_steps=1)


def test_mask_agreement_2d() -> None:
    attr = np.zeros((10, 10))
    attr[2, 2] = 3.0  # inside the mask
    attr[8, 8] = 1.0  # outside
    attr[5, 5] = -4.0  # negative evidence does not count
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[1:4, 1:4] = 1
    res = mask_agreement(attr, mask)
    assert res["energy_in_mask"] == pytest.approx(0.75)
    assert res["mask_fraction"] == pytest.approx(0.09)
    assert res["lift"] == pytest.approx(0.75 / 0.09)
    assert res["pointing_hit"] is True
    attr[8, 8] = 5.0  # the peak moves away from the mask
    assert mask_agreement(attr, mask)["pointing_hit"] is False
    near = np.zeros((10, 10))
    near[4, 4] = 1.0  # one pixel diagonally off the mask
    assert mask_agreement(near, mask, tolerance=0)["pointing_hit"] is False
    assert mask_agreement(near, mask, tolerance=1)["pointing_hit"] is True


def test_mask_agreement_3d_and_edge_cases() -> None:
    attr = np.zeros((4, 6, 6))
    attr[1, 2:4, 2:4] = 1.0
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1, 2:4, 2:3] = True
    res = mask_agreement(attr, mask)
    assert res["energy_in_mask"] == pytest.approx(0.5)
    assert res["pointing_hit"] is True
    empty = mask_agreement(attr, np.zeros_like(mask))
    assert empty["energy_in_mask"] is None and empty["pointing_hit"] is None
    assert mask_agreement(np.zeros_like(attr), mask)["energy_in_mask"] is None
    with pytest.raises(DataError, match=r"Got attribution \(4, 6, 6\) and mask \(6, 6\)"):
        mask_agreement(attr, mask[0])


def test_randomisation_in_3d_cascades_every_stage() -> None:
    model = TinyCNN(dims=3)
    res = randomization_check(model, torch.rand(2, 1, 6, 10, 10), 0, "smoothgrad", max_steps=4,
                              n_samples=2)
    assert [s["randomized"] for s in res["steps"]] == ["classifier_layer", "feature_layer.0", "stem.0"]
    assert all(len(s["ssim"]) == 2 for s in res["steps"])
    assert isinstance(res["passed"], bool) and res["verdict"]
