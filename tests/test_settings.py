"""One settings table per program (common/settings.py, declared in job/config.py and
export/config.py): flags in every form, a flag beating its variable, one-line errors, --help, and
docs/settings.md as the tables generate it."""
import subprocess
import sys

import pytest

from common import settings
from devkit import settings_doc
from export.config import ExportConfig
from job.config import Config

ROOT = settings_doc.PAGE.parents[1]
REQUIRED = {"DATA_URI": "/data"}


@pytest.mark.parametrize("argv", [["--fine-tune-epochs", "3"], ["--fine-tune-epochs=3"],
                                  ["--fine_tune_epochs=3"], ["--FINE_TUNE_EPOCHS=3"],
                                  ["--FINE_TUNE_EPOCHS", "3"]])
def test_each_flag_form_sets_its_setting(argv):
    assert Config.from_env(REQUIRED, argv).fine_tune_epochs == 3


def test_a_flag_beats_the_environment_variable():
    config = Config.from_env({**REQUIRED, "FINE_TUNE_EPOCHS": "7", "SEED": "5"},
                             ["--fine-tune-epochs=3"])
    assert (config.fine_tune_epochs, config.seed) == (3, 5)


def test_a_required_setting_may_come_as_a_flag():
    assert Config.from_env({}, ["--data-uri", "gs://b/images"]).data_uri == "gs://b/images"


def test_a_bare_switch_flag_turns_it_on_and_takes_a_value_too():
    assert Config.from_env(REQUIRED, ["--tta"]).tta is True
    assert Config.from_env(REQUIRED, ["--augment", "off"]).augment is False


def test_a_flag_value_is_validated_as_the_variable_is():
    from_flag, from_variable = [pytest.raises(settings.ConfigError) for _ in range(2)]
    with from_flag as flag_error:
        Config.from_env(REQUIRED, ["--batch_size=0"])
    with from_variable as variable_error:
        Config.from_env({**REQUIRED, "BATCH_SIZE": "0"})
    assert str(flag_error.value) == str(variable_error.value) == \
        "BATCH_SIZE='0' is not valid: expected an integer >= 1"


def test_backbone_rules_follow_a_backbone_given_as_a_flag():
    config = Config.from_env(REQUIRED, ["--backbone=mobilenet_v2"])
    assert (config.image_size, config.fine_tune_from, config.fine_tune_learning_rate) == \
        (224, "block_13_expand", 1e-4)


def test_a_config_built_directly_gets_the_defaults_a_read_one_gets():
    for backbone in ("vgg16", "mobilenet_v2"):
        built = Config(data_uri="/data", backbone=backbone, run_id="r1")
        read = Config.from_env({**REQUIRED, "BACKBONE": backbone, "RUN_ID": "r1"})
        assert built == read


def test_export_settings_take_flags_too():
    config = ExportConfig.from_env({"RUN_URI": "/runs/r1", "OPSET": "13"},
                                   ["--opset", "15", "--INT8=0"])
    assert (config.opset, config.int8) == (15, False)


@pytest.mark.parametrize("module, env", [("job", {"DATA_URI": "/absent"}),
                                         ("export", {"RUN_URI": "/absent"})])
def test_a_bad_flag_value_exits_2_with_one_line_naming_the_variable(module, env, main_in_process):
    result = main_in_process(module, env, ["--seed=-3"] if module == "job" else ["--opset=99"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    variable = "SEED='-3'" if module == "job" else "OPSET='99'"
    assert len(errors) == 1 and f"{variable} is not valid" in errors[0]


def test_an_unknown_flag_exits_2_with_one_line_naming_it(main_in_process):
    result = main_in_process("job", REQUIRED, ["--learning-rate=0.01"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR job: " in line]
    assert len(errors) == 1 and "unrecognized arguments: --learning-rate=0.01" in errors[0]
    assert "python -m job --help" in errors[0]


@pytest.mark.parametrize("module, config_class", [("job", Config), ("export", ExportConfig)])
def test_help_exits_0_and_lists_every_setting_with_its_default(module, config_class,
                                                               main_in_process):
    result = main_in_process(module, {}, ["--help"])
    assert result.returncode == 0 and result.stderr == ""
    for each in settings.settings_of(config_class).values():
        assert f"{each.variable}, {each.flag}" in result.stdout
        assert each.default_text() in result.stdout
    assert "(default: 150 for vgg16, else 224)" in result.stdout or module == "export"


def test_python_m_job_help_exits_0_without_starting_tensorflow():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "job", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "FINE_TUNE_EPOCHS, --fine-tune-epochs" in result.stdout
    assert " tensorflow" not in result.stderr  # -X importtime lists every module imported


def test_docs_settings_md_is_the_page_the_tables_generate():
    assert settings_doc.PAGE.read_text() == settings_doc.page(), \
        f"docs/settings.md is out of date: run `{settings_doc.COMMAND}`"
