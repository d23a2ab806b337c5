"""Simulated boards without a hub: shims, per-board isolation, flash, resets, console, UART."""

import os
import textwrap

import pytest

import smartx_device.clock as host_sdk_clock
from firmware_sim import (HARD_RESET, PWRON_RESET, SOFT_RESET, WDT_RESET, Board, BoardClock,
                          ConsoleTimeout, Flash, Sensor)


def make_board(tmp_path, name, source, **options):
    script = tmp_path / (name + "_main.py")
    script.write_text(textwrap.dedent(source))
    return Board(name, str(script), directory=str(tmp_path / name), **options)


def test_each_board_has_its_own_machine_time_and_sdk(tmp_path):
    source = """
        import machine, time, sys
        import smartx_device
        from smartx_device import clock
        before = clock.monotonic_ms()
        time.sleep_ms(50)
        print("uid=%s sdk=%d ticks=%s impl=%s" % (machine.unique_id().hex(), id(smartx_device),
              clock.monotonic_ms() - before >= 50, sys.implementation.name))
        print("has_ticks=%s" % hasattr(time, "ticks_ms"))
    """
    host_state = dict(host_sdk_clock._state)
    boards = [make_board(tmp_path, name, source) for name in ("alpha", "beta")]
    try:
        for board in boards:
            board.start()
        lines = [board.console.expect(r"uid=(\w+) sdk=(\d+) ticks=(\w+) impl=(\w+)", 10)
                 for board in boards]
        assert lines[0].group(1) != lines[1].group(1)  # unique_id per board
        assert lines[0].group(2) != lines[1].group(2)  # a copy of the SDK per board
        assert all(line.group(3) == "True" for line in lines)  # the SDK counts board time
        assert all(line.group(4) == "cpython" for line in lines)
        for board in boards:
            board.console.expect("has_ticks=True", 5)
            board.wait_for(lambda b=board: b.state == "exited", 5)
        assert host_sdk_clock._state == host_state  # the host's SDK module was not touched
    finally:
        for board in boards:
            board.close()


def test_flash_survives_resets_and_confines_the_firmware(tmp_path):
    board = make_board(tmp_path, "flashy", """
        import machine, os, time
        with open("boots.txt", "a") as log:
            log.write("%d\\n" % machine.reset_cause())
        try:
            open("../../../../../etc/hostname").read()
            print("escaped")
        except OSError as error:
            print("confined errno=%d" % error.args[0])
        print("cwd=%s fsync=%s replace=%s" % (os.getcwd(), hasattr(os, "fsync"),
                                              hasattr(os, "replace")))
        print("files=%s" % ",".join(os.listdir("/")))
        while True:
            time.sleep_ms(20)
    """)
    try:
        board.start()
        board.console.expect(r"confined errno=2", 10)
        board.console.expect(r"cwd=/ fsync=False replace=False", 5)
        board.console.expect(r"files=boots.txt,main.py", 5)
        board.power_cycle()
        board.console.expect(r"confined", 10)
        board.reset()
        board.console.expect(r"confined", 10)
        assert board.flash.read_file("boots.txt").split() == [
            str(PWRON_RESET).encode(), str(PWRON_RESET).encode(), str(HARD_RESET).encode()]
        assert board.boots == 3
        assert "escaped" not in board.console.text
    finally:
        board.close()


def test_firmware_resets_watchdog_and_timer_soft_irqs(tmp_path):
    board = make_board(tmp_path, "resetter", """
        import machine, time
        cause = machine.reset_cause()
        print("cause=%d" % cause)
        if cause == machine.PWRON_RESET:
            machine.reset()
        elif cause == machine.SOFT_RESET:
            dog = machine.WDT(timeout=100)
            time.sleep_ms(2000)
            print("watchdog did not bite")
        else:
            led = machine.Pin(2, machine.Pin.OUT)
            timer = machine.Timer(-1)
            timer.init(period=20, mode=machine.Timer.PERIODIC, callback=lambda t: led.toggle())
            time.sleep_ms(300)
            timer.deinit()
            print("timer done")
    """)
    try:
        board.start()
        board.console.expect("timer done", 10)
        causes = [int(x) for x in __import__("re").findall(r"cause=(\d+)", board.console.text)]
        assert causes == [PWRON_RESET, SOFT_RESET, WDT_RESET]
        assert "watchdog did not bite" not in board.console.text
        assert board.pin(2).toggles >= 5
        assert board.reset_cause_name == "WDT_RESET"
    finally:
        board.close()


def test_a_crash_prints_the_firmware_traceback_and_the_board_stays_up(tmp_path):
    board = make_board(tmp_path, "crashy", """
        def read_sensor():
            raise ValueError("sensor on fire")
        read_sensor()
    """)
    try:
        board.start()
        board.console.expect("ValueError: sensor on fire", 10)
        board.wait_for(lambda: board.state == "crashed", 5)
        assert "read_sensor" in board.crash
        assert "firmware_sim" not in board.crash  # the simulator's frames are not shown
        board.flash.write_file("main.py", "print('fixed')\n")
        board.reset()
        board.console.expect("fixed", 10)
        board.wait_for(lambda: board.state == "exited", 5)
        assert board.crash is None
    finally:
        board.close()


def test_advancing_board_time_wakes_a_long_sleep(tmp_path):
    board = make_board(tmp_path, "sleeper", """
        import time
        start = time.ticks_ms()
        print("sleeping")
        time.sleep(3600)
        print("woke after %d ms" % time.ticks_diff(time.ticks_ms(), start))
    """)
    try:
        board.start()
        board.console.expect("sleeping", 10)
        board.clock.advance(3_600_000)
        match = board.console.expect(r"woke after (\d+) ms", 3)
        assert int(match.group(1)) >= 3_600_000
    finally:
        board.close()


def test_console_input_uart_and_pin_irq(tmp_path):
    board = make_board(tmp_path, "io", """
        import machine, time
        name = input("name? ")
        print("hello %s" % name)
        uart = machine.UART(2, 9600, timeout=2000)
        uart.write(b"ping")
        print("reply=%r" % uart.readline())
        button = machine.Pin(0, machine.Pin.IN, machine.Pin.PULL_UP)
        button.irq(lambda pin: print("pressed level=%d" % pin.value()),
                   trigger=machine.Pin.IRQ_FALLING)
        print("armed")
        while True:
            time.sleep_ms(10)
    """)
    try:
        board.start()
        board.console.expect("name\\? ", 10)
        board.console.send("world\n")
        board.console.expect("hello world", 5)
        assert board.uart(2).host_read(timeout=5) == b"ping"
        board.uart(2).host_write(b"pong\n")
        board.console.expect(r"reply=b'pong\\n'", 5)
        board.console.expect("armed", 5)
        board.drive_pin(0, 0)
        board.console.expect("pressed level=0", 5)
        with pytest.raises(ConsoleTimeout):
            board.console.expect("never printed", 0.2)
    finally:
        board.close()


def test_adc_reads_scripted_values_then_seeded_noise(tmp_path):
    board = make_board(tmp_path, "adc", """
        import machine
        scripted = machine.ADC(machine.Pin(26))
        noisy = machine.ADC(27)
        print("scripted=%s" % [scripted.read_u16() for _ in range(4)])
        print("noisy=%s" % [noisy.read_u16() for _ in range(3)])
    """, sensor=Sensor(seed=7))
    board.sensor.script(26, [100, 200, 300])
    try:
        board.start()
        board.console.expect(r"scripted=\[100, 200, 300, 300\]", 10)
        noisy = board.console.expect(r"noisy=(\[.*\])", 5).group(1)
    finally:
        board.close()
    values = eval(noisy)  # a list of ints the firmware printed
    assert all(0 <= v <= 65535 for v in values) and len(set(values)) > 1


def test_seeded_sensor_noise_is_repeatable():
    first, second, other = Sensor(seed=1), Sensor(seed=1), Sensor(seed=2)
    a = [first.read_u16(26, t * 1000.0) for t in range(20)]
    b = [second.read_u16(26, t * 1000.0) for t in range(20)]
    c = [other.read_u16(26, t * 1000.0) for t in range(20)]
    assert a == b
    assert a != c
    function_sensor = Sensor()
    function_sensor.script(1, lambda ms: ms * 2)
    assert function_sensor.read_u16(1, 1000.0) == 2000
    assert function_sensor.read_u16(1, 1e9) == 65535  # clamped to 16 bits


def test_flash_paths_and_tearing(tmp_path):
    flash = Flash(str(tmp_path / "flash"))
    assert flash.board_path("a/../../b") == "/b"
    assert flash.host_path("/../../etc/passwd") == os.path.join(flash.root, "etc", "passwd")
    os_module = flash.os_module()
    os_module.mkdir("/lib")
    os_module.chdir("lib")
    with flash.open("data.bin", "wb") as handle:
        handle.write(b"0123456789")
    assert flash.files() == {"/lib/data.bin": 10}
    assert flash.tear_last_write(4)
    assert flash.read_file("/lib/data.bin") == b"012345"
    with flash.open("/x.txt", "w") as handle:
        handle.write("one")
    with flash.open("/y.txt", "w") as handle:
        handle.write("two")
    os_module.rename("/y.txt", "/x.txt")  # replaces, as littlefs does
    assert flash.read_file("/x.txt") == b"two"
    with pytest.raises(OSError) as error:
        os_module.stat("/missing")
    assert flash.root not in str(error.value)  # errors name board paths only
    assert os_module.stat("/x.txt")[6] == 3
    assert os_module.statvfs("/")[0] == 4096


def test_board_clock_can_be_given_and_starts_near_the_wrap(tmp_path):
    clock = BoardClock(start_ms=(1 << 30) - 200)
    board = make_board(tmp_path, "wrap", """
        import time
        first = time.ticks_ms()
        time.sleep_ms(400)
        second = time.ticks_ms()
        print("wrapped=%s diff=%d" % (second < first, time.ticks_diff(second, first)))
    """, clock=clock)
    try:
        board.start()
        match = board.console.expect(r"wrapped=(\w+) diff=(\d+)", 10)
        assert match.group(1) == "True"
        assert 400 <= int(match.group(2)) < 1000
    finally:
        board.close()
