"""A board's serial link on a pseudo-terminal, opened by pyserial as a USB adapter."""

import os
import textwrap
import time

import pytest
import serial

from firmware_sim import Board, FaultPlan
from smartx_device.framing import ConsoleText, SerialFramer

#: Firmware: frames go out on UART 1 with the SDK's serial framing, console text between them;
#: frames coming in are decoded and echoed on the console.
FRAMES_FIRMWARE = """
    import machine, time
    from smartx_device.framing import SerialFramer, ConsoleText
    uart = machine.UART(1, 115200)
    framer = SerialFramer()
    print("board up")
    for n in range(COUNT):
        uart.write(framer.encode(b"frame-%d" % n))
        print("sent %d" % n)
    while True:
        data = uart.read(256)
        if data:
            for item in framer.feed(data):
                if not isinstance(item, ConsoleText):
                    print("board got %s" % item.decode())
        time.sleep_ms(5)
"""


def serial_board(tmp_path, count=5, **options):
    script = tmp_path / "frames.py"
    script.write_text(textwrap.dedent(FRAMES_FIRMWARE).replace("COUNT", str(count)))
    return Board("serial-board", str(script), directory=str(tmp_path / "board"), serial=True,
                 **options)


def read_items(port, framer, until, timeout=5.0):
    """Read the port until ``until(items)`` holds; return the items."""
    items = []
    deadline = time.monotonic() + timeout
    while not until(items):
        assert time.monotonic() < deadline, "port gave only %r" % (items,)
        data = port.read(4096)
        if data:
            items.extend(framer.feed(data))
    return items


def test_pyserial_opens_the_link_and_it_carries_frames_and_console_text(tmp_path):
    board = serial_board(tmp_path)
    try:
        assert os.path.realpath(board.serial_path).startswith("/dev/pts/")
        with serial.Serial(board.serial_path, 115200, timeout=0.1) as port:
            board.start()
            framer = SerialFramer()
            # Console text is delivered when the next 0x00 ends it: wait for the last frame.
            items = read_items(port, framer, lambda got: b"frame-4" in got)
            expected = [ConsoleText(b"board up\n")]
            for n in range(5):
                expected.append(b"frame-%d" % n)
                if n < 4:
                    expected.append(ConsoleText(b"sent %d\n" % n))
            assert items == expected  # frames and the console text between them, in order
            assert framer.corrupt == 0
            port.write(SerialFramer().encode(b"hello-board"))
            board.console.expect("board got hello-board", 5)
        counters = board.serial.counters.as_dict()
        assert counters["up"]["frames"] == 5 and counters["down"]["frames"] == 1
        assert board.serial.console_bytes > 0
    finally:
        board.close()


def test_faults_on_the_serial_link_follow_the_plan(tmp_path):
    plan = (FaultPlan(seed=11).add("drop", at=1, direction="up")
            .add("corrupt", at=2, direction="up").add("duplicate", at=3, direction="up"))
    board = serial_board(tmp_path, count=6, faults=plan)
    try:
        with serial.Serial(board.serial_path, timeout=0.1) as port:
            board.start()
            framer = SerialFramer()
            items = read_items(port, framer, lambda got: b"frame-5" in got)
            frames = [i for i in items if not isinstance(i, ConsoleText)]
            assert frames == [b"frame-0", b"frame-3", b"frame-3", b"frame-4", b"frame-5"]
            assert framer.corrupt == 1  # the flipped bit failed its CRC and was dropped
        counters = board.serial.counters
        assert (counters.dropped, counters.corrupted, counters.duplicated) == (1, 1, 1)
        assert counters.recovered == 3  # frame-4 went through intact after all three
        assert [(e.frame, e.kind) for e in plan.sequence("up")] == [
            (1, "drop"), (2, "corrupt"), (3, "duplicate")]
    finally:
        board.close()


def test_unplug_fails_the_open_port_and_replug_keeps_the_path(tmp_path):
    board = serial_board(tmp_path, count=1)
    try:
        board.start()
        path = board.serial_path
        port = serial.Serial(path, timeout=0.1)
        board.serial.unplug()
        assert not os.path.exists(path)
        with pytest.raises(serial.SerialException):
            for _ in range(20):
                port.read(1)
                port.write(b"x")
        port.close()
        board.serial.replug()
        assert os.path.exists(path)
        with serial.Serial(path, timeout=0.1) as again:
            again.write(SerialFramer().encode(b"after-replug"))
            board.console.expect("board got after-replug", 5)
        board.serial.unplug(duration_ms=100)  # a disconnect fault: back by itself
        deadline = time.monotonic() + 3
        while not board.serial.plugged:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert os.path.exists(path)
    finally:
        board.close()


def test_the_link_paces_bytes_at_the_line_rate(tmp_path):
    board = serial_board(tmp_path, count=0, serial_baudrate=57600)
    payload = b"x" * 250
    try:
        with serial.Serial(board.serial_path, timeout=0.1) as port:
            board.start()
            board.console.expect("board up", 5)
            port.reset_input_buffer()
            began = time.monotonic()
            frame = SerialFramer().encode(payload)
            for _ in range(12):  # 12 frames of 258 bytes: 0.54 s at 57600 baud (10 bits/byte)
                board.serial.board_write(frame)
            received = 0
            while received < 12 * len(frame):
                received += len(port.read(4096))
                assert time.monotonic() - began < 5
            elapsed = time.monotonic() - began
        assert elapsed >= 0.9 * 12 * len(frame) * 10 / 57600
    finally:
        board.close()
