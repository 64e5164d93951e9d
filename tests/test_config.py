"""Configs are validated at the door: one line naming the file, the field and the fix."""

from pathlib import Path

import pytest

from common.config import load_config
from common.errors import UserError


def test_profiles_load():
    for p in (
        "configs/mini.yaml",
        "configs/micro.yaml",
        "configs/mini-wide.yaml",
        "configs/mini-conflict.yaml",
        "configs/mini-conflict-frozen.yaml",
    ):
        cfg = load_config(p)
        assert cfg.tasks.pool and cfg.expert.method == "lora"


def test_overrides_are_typed():
    cfg = load_config(
        "configs/micro.yaml",
        ["expert.steps=7", "interpolate.train_experts=false", "tasks.pool=[nli,shape,vqa]"],
    )
    assert (
        cfg.expert.steps == 7
        and cfg.interpolate.train_experts is False
        and cfg.tasks.pool == ["nli", "shape", "vqa"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("expert.rank=4", "override 'expert.rank=4': unknown field 'expert.rank'"),
        ("expert.steps=many", "override 'expert.steps=many': field 'expert.steps' is 'many'; expected int"),
        (
            "interpolate.groups=row",
            "field 'interpolate.groups' is 'row'; use one of global, layer, site, tensor",
        ),
        ("steps", "expected key=value"),
        ("tasks.pool=[snli-ve,", "override 'tasks.pool=[snli-ve,': the value is not valid YAML"),
    ],
)
def test_bad_fields_are_named_with_what_set_them(override, message):
    """An override's error names the override; a bad field in the profile file names the file."""
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config("configs/micro.yaml", [override])


def test_a_bad_field_in_the_file_names_the_file(tmp_path):
    from conftest import REPO

    (tmp_path / "mine.yaml").write_text(f"base: {REPO / 'configs/micro.yaml'}\nexpert: {{rank: 4}}\n")
    with pytest.raises(UserError, match=r"mine.yaml: unknown field 'expert.rank'"):
        load_config(str(tmp_path / "mine.yaml"), ["expert.r=2"])


def test_a_list_override_split_at_its_spaces_is_joined_again():
    """make passes OVERRIDES through the shell, which splits tasks.pool=['snli-ve', 'nli'] at its space."""
    from common.config import split_overrides

    words = ["tasks.pool=[snli-ve,", "nli]", "expert.r=2"]
    assert split_overrides(words) == ["tasks.pool=[snli-ve, nli]", "expert.r=2"]
    assert load_config("configs/micro.yaml", words + ["interpolate.top_k=1"]).tasks.pool == ["snli-ve", "nli"]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("expert: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_a_profile_takes_its_base_profiles_fields_under_its_own(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "profile: b\nseed: 3\nexpert: {r: 2, steps: 7}\ninterpolate: {top_k: 1}\n"
    )
    (tmp_path / "mine.yaml").write_text("base: base.yaml\nprofile: mine\nexpert: {r: 5}\n")
    cfg = load_config(str(tmp_path / "mine.yaml"), ["expert.lr=0.5"])
    assert (cfg.profile, cfg.seed, cfg.expert.r, cfg.expert.steps, cfg.expert.lr) == ("mine", 3, 5, 7, 0.5)
    (tmp_path / "base.yaml").write_text("base: mine.yaml\n")
    with pytest.raises(UserError, match="field 'base' makes a loop"):
        load_config(str(tmp_path / "mine.yaml"))
    (tmp_path / "mine.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="nowhere.yaml: the base of .*mine.yaml not found"):
        load_config(str(tmp_path / "mine.yaml"))


def test_the_embed_sections_old_name_is_refused_with_the_new_one(tmp_path):
    """A profile or an override that still says `fisher` (the section's name before it was `embed`) stops in
    one line that names the new one; the fix, typed as written, loads."""
    from common.config import load_config
    from common.errors import UserError

    old = tmp_path / "old.yaml"
    old.write_text("base: " + str(Path("configs/micro.yaml").resolve()) + "\nfisher: {embedding: weights}\n")
    with pytest.raises(UserError, match=r"old.yaml: section 'fisher' is now 'embed' .*rename it to 'embed:'"):
        load_config(str(old))
    old.write_text(old.read_text().replace("fisher:", "embed:"))
    assert load_config(str(old)).embed.embedding == "weights"
    with pytest.raises(UserError, match=r"^override 'fisher.samples=4': .* write embed.samples=4$"):
        load_config("configs/micro.yaml", ["fisher.samples=4"])
    assert load_config("configs/micro.yaml", ["embed.samples=4"]).embed.samples == 4
    with pytest.raises(UserError, match=r"write embed=\{samples: 4\}$"):  # the whole section at once
        load_config("configs/micro.yaml", ["fisher={samples: 4}"])
    assert load_config("configs/micro.yaml", ["embed={samples: 4}"]).embed.samples == 4
