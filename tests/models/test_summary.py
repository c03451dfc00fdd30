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
        summary.main(["--layer-groups", "3", "--no-flops"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer_groups=3" in err
