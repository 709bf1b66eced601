"""Saliency of an ensemble explains every member: Grad-CAM at the same layer of each member,
and a cascading randomisation that re-initialises a stage in all members at once."""

from __future__ import annotations

import pytest
import torch
from _explain_models import TinyCNN, blobs

from medtl.explain._stages import cascade_stages, ensemble_members
from medtl.explain.attribution import _methods, explain, gradcam_layer, member_layers
from medtl.explain.sanity import randomization_check
from medtl.models.ensemble import EnsembleClassifier
from medtl.models.heads import HeadSpec, MultiTaskHead, TaskView


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ensemble(n: int = 3) -> EnsembleClassifier:
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        members.append(TinyCNN().eval())
    return EnsembleClassifier(members).eval()


def test_member_layers_finds_the_same_layer_in_every_member() -> None:
    ens = _ensemble(3)
    for m in ens.members:
        assert member_layers(ens, m.feature_layer) == [x.feature_layer for x in ens.members]
    single = TinyCNN()
    assert member_layers(single, single.feature_layer) == [single.feature_layer]
    assert ensemble_members(single) is None
    # a layer outside the members (or a one-member ensemble) is used alone
    one = EnsembleClassifier([TinyCNN()])
    assert member_layers(one, one.members[0].feature_layer) == [one.members[0].feature_layer]


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_ensemble_gradcam_does_not_depend_on_which_member_layer_is_given(method: str) -> None:
    ens = _ensemble(3)
    x, y, _ = blobs(4)
    maps = [explain(ens, x, y, method, layer=m.feature_layer) for m in ens.members]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0])
    # it is the mean over members, each at its own layer under the ensemble's output; one
    # member's layer alone (what a plain LayerGradCam gives) is a different map
    fn = _methods.gradcam if method == "gradcam" else _methods.guided_gradcam
    per = [fn(ens, x.clone().requires_grad_(True), y, m.feature_layer).detach() for m in ens.members]
    torch.testing.assert_close(maps[0], torch.stack(per).mean(0))
    scaled = [m / m.abs().amax() for m in (per[0], maps[0])]
    assert not torch.allclose(*scaled, atol=1e-3)


def test_gradcam_layer_of_an_ensemble_seen_through_one_task_head() -> None:
    ens = _ensemble(2)
    head = MultiTaskHead([HeadSpec("finding", "binary", ["no", "yes"], 1.0)])
    x, y, _ = blobs(2)
    view = TaskView(ens, head, "finding")
    layer, _, _ = gradcam_layer(view, x, max_stride=16)
    assert member_layers(view, layer) == [m.get_submodule(_name(ens, layer)) for m in ens.members]
    assert explain(view, x, torch.zeros(2, dtype=torch.long), "gradcam", layer=layer).shape == (2, 24, 24)


def _name(ens: EnsembleClassifier, layer: torch.nn.Module) -> str:
    return next(n for m in ens.members for n, mod in m.named_modules() if mod is layer)


def test_cascade_of_an_ensemble_randomises_each_stage_in_every_member() -> None:
    ens = _ensemble(3)
    one = cascade_stages(ens.members[0])
    stages = cascade_stages(ens)
    assert [name for name, _ in stages] == [f"{name} (x3 members)" for name, _ in one]
    assert stages[0][1] == [m.classifier_layer for m in ens.members]
    for (_, mods), (_, mods1) in zip(stages, one):
        assert len(mods) == 3 * len(mods1)


def test_randomisation_check_on_an_ensemble_changes_every_member() -> None:
    ens = _ensemble(2)
    x, y, _ = blobs(4)
    res = randomization_check(ens, x, y, "gradcam", max_steps=2, layer=ens.members[0].feature_layer)
    assert res["steps"][0]["randomized"] == "classifier_layer (x2 members)"
    assert res["steps"][-1]["randomized"].startswith("all (")
    # the trained ensemble is untouched
    torch.testing.assert_close(explain(ens, x, y, "gradcam", layer=ens.members[0].feature_layer),
                               explain(ens, x, y, "gradcam", layer=ens.members[1].feature_layer))
