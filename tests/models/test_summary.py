from soda.models import summary


def test_summary_prints_the_reference_figures(capsys):
    summary.main([])
    out = capsys.readouterr().out
    assert "encoder parameters  11.2 M" in out
    assert "decoder parameters  39.6 M" in out
    assert "training step FLOPs 40.7 GFLOP per image" in out


def test_summary_reports_impossible_settings_in_one_line(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        summary.main(["model.layer_groups=3", "--no-flops"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer_groups=3" in err


def test_summary_builds_the_model_of_the_overrides(capsys):
    summary.main(["model=tiny", "dataset=shapes", "--no-flops"])
    out = capsys.readouterr().out
    assert "model     tiny: encoder resnet18, latent 64" in out
    assert "decoder parameters  0.2 M" in out


def test_summary_reports_an_unknown_key_in_one_line(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        summary.main(["model.latent_dims=3", "--no-flops"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Key 'latent_dims' not in 'ModelConfig'" in err
