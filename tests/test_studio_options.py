"""The studio's forms are built from the commands' option definitions (reneg.options and the commands'
parsers), not from copies: the same defaults, choices and help, and the same checks with the same
messages. No gradio needed: the forms are plain data."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from reneg import options as O
from reneg.studio import forms
from reneg.studio.forms import EVAL, TRAIN, TUNE, EvalForm, FormError, TrainForm, TuneForm

SPECS = [(TRAIN, TrainForm), (EVAL, EvalForm), (TUNE, TuneForm)]

# the only fields whose default on the page is not the command's (each says why in reneg/studio/forms.py)
OWN = {
    "train": {"out", "sample_every"},
    "eval": {"out", "negatives", "handcrafted", "limit"},
    "tune": set(),
}


@pytest.fixture()
def fresh_parsers():
    forms._command_parser.cache_clear()
    yield
    forms._command_parser.cache_clear()


def _option_name(flag: str) -> str | None:
    """The shared setting of reneg.options a flag belongs to, if any."""
    return next((f.name for f in fields(O.ReNegOptions) if O.flag_of(f.name) == flag), None)


# fields whose flag the command defines itself, not from reneg.options: reneg eval's --frames defaults to
# the model's own count (None), train's and tune's to 1 (images)
OWN_FLAG = {("eval", "frames")}


@pytest.mark.parametrize("spec,form", SPECS, ids=[s.command for s, _ in SPECS])
def test_every_field_shown_takes_the_commands_default(spec, form):
    made = form()
    assert [f.name for f in fields(form) if f.name != "extra"] == list(spec.fields)
    own = {name for name, f in spec.fields.items() if f.own is not forms._CLI}
    assert own == OWN[spec.command]
    shared = 0
    for name, f in spec.fields.items():
        if name in own:
            continue
        parser_default = spec.action(name).default
        if f.part is not None:
            parser_default = parser_default[f.part]
        shown = getattr(made, name)
        assert shown == ("" if parser_default in (None, []) else parser_default), (spec.command, name)
        opt = _option_name(f.flag)
        if (spec.command, name) in OWN_FLAG:
            opt = None
        if opt is not None:  # a shared setting: the value is reneg.options' own
            d = O.default(opt)
            d = d[f.part] if f.part is not None else d
            assert shown == ("" if d in (None, []) else d), (spec.command, name)
            shared += 1
    assert shared >= 6, spec.command  # sampling, recipe and search settings all come from reneg.options


def test_choices_and_help_are_the_commands():
    assert TRAIN.choices("mixed_precision") == list(O._FIELDS["mixed_precision"].metadata["argparse"]["choices"])
    from reneg.trainer.events import REPORT_TO

    assert TRAIN.choices("report_to") == list(REPORT_TO)
    assert TUNE.choices("noise") == ["seed", "fresh"] == list(TUNE.action("noise").choices)
    assert TRAIN.help("keep_best_by") == O.help_of("keep_best_by")
    assert TRAIN.help("monitor_rewards") == O.help_of("monitor_rewards")


def test_a_default_changed_in_the_options_changes_the_studio(monkeypatch, fresh_parsers, tmp_path):
    monkeypatch.setattr(O._FIELDS["guidance"], "default", 9.25)
    monkeypatch.setattr(O._FIELDS["max_steps"], "default", 7)
    monkeypatch.setattr(O._FIELDS["grad_range"], "default", (1, 5))
    forms._command_parser.cache_clear()
    assert TrainForm().guidance == EvalForm().guidance == TuneForm().guidance == 9.25
    assert (TrainForm().grad_lo, TrainForm().grad_hi, TuneForm().grad_lo, TuneForm().grad_hi) == (1, 5, 1, 5)
    assert TuneForm().max_steps == 7
    from reneg.studio.app import Studio

    studio = Studio(demo=False, root=str(tmp_path))
    assert studio.tune_defaults()["max_steps"] == 7 and studio.eval_defaults().guidance == 9.25
    assert studio.tune_defaults() == dict(asdict(TuneForm()), model="", config="", rewards="")


def _cli_error(capsys, argv: list[str]) -> str:
    from reneg.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = f"reneg {argv[0]}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) :]


def test_a_bad_value_is_refused_by_the_same_check_with_the_clis_message(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green circle\n")
    model = str(tmp_path / "no-model")
    # train: a resolution the VAE can not take; a model that is not there
    for bad in ({"resolution": 30}, {"batch_size": 0}, {}):
        form = TrainForm(model=model, rewards="hpsv2=x.pt", prompts=str(prompts), out=str(tmp_path / "o"), **bad)
        cli = _cli_error(capsys, ["train", *forms.train_args(form)])
        with pytest.raises(FormError) as e:
            forms.check_train(form)
        assert str(e.value) == forms.name_fields(cli, forms.TRAIN_NAMES), (bad, cli)
        assert "--" not in str(e.value).split(":")[0]
    # tune: patience above max steps, a guidance that is not finite (the options layer's checks)
    base = dict(asdict(TuneForm()), model=model, rewards="hpsv2=x.pt", prompt="a cat")
    for bad in ({"patience": 11}, {"guidance": float("nan")}, {"prompt": " "}):
        v = dict(base, **bad)
        cli = _cli_error(capsys, ["tune", *forms.tune_args(v), f"--out={tmp_path / 't.safetensors'}"])
        with pytest.raises(FormError) as e:
            forms.check_tune(v)
        assert str(e.value) == forms.name_fields(cli, forms.TUNE_NAMES), (bad, cli)
    assert forms.name_fields("--patience 11 is above --max-steps 10", forms.TUNE_NAMES) == (
        '"patience P" 11 is above "max steps N" 10'
    )
    # eval: a seed beyond the last one the images can use
    ev = EvalForm(model=model, rewards="hpsv2=x.pt", prompts=str(prompts), out=str(tmp_path / "ev"), seed=str(2**64))
    cli = _cli_error(capsys, ["eval", *forms.eval_args(ev)])
    with pytest.raises(FormError) as e:
        forms.check_eval(ev)
    assert str(e.value) == forms.name_fields(cli, forms.EVAL_NAMES) and str(e.value).startswith('"seed"'), cli
