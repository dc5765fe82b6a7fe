"""Bad arguments end in one clear line naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from conntrail.cli.main import main


@pytest.mark.parametrize(("argv", "message"), [
    (["watch", "--events", "new,created"], "--events: unknown event kind 'created'"),
    (["record", "-o", "-", "--events", "dump"], "--events: use --dump"),
    (["record", "-o", "-", "--count", "0"], "--count: must be a positive number"),
    (["watch", "--buffer", "4G"], "--buffer: at most 1G"),
    (["watch", "--format", "{sport:d}"], "--format: cannot render"),
    (["watch", "--events", "dump"], "--events: use --dump to show existing flows"),
    (["watch", "-p", "tcp,bogus"], "--proto: unknown protocol 'bogus'"),
    (["watch", "--filter", "dprt == 1"], "unknown field 'dprt'"),
    (["watch", "--format", "{nope}"], "--format: unknown field {nope}"),
    (["watch", "--buffer", "lots"], "--buffer: not a size: 'lots'"),
    (["watch", "--count", "0"], "--count: must be a positive number"),
    (["watch", "--netns", "ctt-no-such-namespace"], "ctt-no-such-namespace"),
    (["decode", "/nonexistent/file.hex"], "FILE: /nonexistent/file.hex"),
    (["record", "-o", "/nonexistent/dir/x.hex", "--netns", "a", "--netns", "b"],
     "--netns: record takes one namespace"),
    (["who", "198.51.100.7:1", "-p", "999"], "--proto: unknown protocol '999'"),
    (["who", "198.51.100.7:1", "-p", "tcp,udp"], "--proto: one protocol, not 'tcp,udp'"),
    (["who", "198.51.100.7:1", "--at", "2300-01-01T00:00:00Z"], "--at: time "),
])
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("conntrail: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["watch", "--count", "many"])
    assert exc.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("conntrail 0.")


def test_decode_reports_bad_lines_and_keeps_good_ones(
        tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    good = ("94000000000100060000000000000000020000003400018014000180080001007f000001080002007f"
            "0000011c000280050001001100000006000200ea4a00000600030015b300003400028014000180080"
            "001007f000001080002007f0000011c00028005000100110000000600020015b3000006000300ea4a"
            "000008000c00ba109ba00800030000000008080007000000001e")
    path = Path(str(tmp_path)) / "mixed.hex"
    path.write_text(f"# header\n1 {good}\n2 zz\n3 {good[:60]}\n4 {good}\n")
    assert main(["decode", str(path)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert f"{path}:3: recording line is not '<ns> <hex>'" in captured.err
    assert f"{path}:4: nlmsghdr length 148 invalid, 30 left at offset 0" in captured.err


def test_closed_pipe_is_not_an_error(tmp_path: pytest.TempPathFactory) -> None:
    """`conntrail decode big.hex | head -1`: exit 0, nothing on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[2] / "data" / "conntrack"
    big = Path(str(tmp_path)) / "big.hex"
    big.write_text("".join(path.read_text() for path in sorted(corpus.glob("*.hex"))) * 20)
    src = str(Path(__file__).resolve().parents[3] / "src")
    proc = subprocess.Popen([sys.executable, "-m", "conntrail", "decode", str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PYTHONPATH": src})
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"@timestamp"')
    proc.stdout.close()
    assert proc.wait(30) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()
