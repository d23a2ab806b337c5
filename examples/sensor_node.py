# SmartX sensor node: MicroPython firmware. Copy this file (as main.py), the smartx_device
# package and the device's credentials bundle (device.smartx.json) onto the board's flash.
# It runs unchanged on a board and on the simulator (which provides `machine`).
#
# Every interval_s seconds it reads an ADC pin and publishes the value on stream "adc".
# Commands: set_interval {"seconds": N}, blink {"times": N}. Desired state: {"led": true|false}.
# Readings made while the hub is away wait in queue.log on flash and are sent when it is back.
# An optional config.json beside it overrides the defaults below, e.g.
#   {"interval_s": 30, "adc_pin": 34, "led_pin": 2}
import json

import machine

import smartx_device
from smartx_device.clock import monotonic_ms, sleep_ms

BUNDLE = "device.smartx.json"
QUEUE = "queue.log"
CONFIG = "config.json"
DEFAULTS = {"interval_s": 10, "adc_pin": 26, "led_pin": 25}
RETRYABLE = (smartx_device.HubUnreachableError, smartx_device.ConnectionLostError,
             smartx_device.RateLimitedError, smartx_device.TokenExpiredError)


def valid(key, value):
    if key == "interval_s":
        return type(value) is int and 1 <= value <= 3600
    return (type(value) is int and value >= 0) or isinstance(value, str)  # a pin: 26 or "GP26"


def load_config():
    config = dict(DEFAULTS)
    try:
        with open(CONFIG) as handle:
            loaded = json.load(handle)
    except OSError:
        return config  # no config.json: the defaults
    except ValueError as error:
        print("config.json is not JSON (%s): using the defaults" % error)
        return config
    for key in DEFAULTS:
        value = loaded.get(key) if isinstance(loaded, dict) else None
        if valid(key, value):
            config[key] = value
        elif value is not None:
            print("config.json: %s=%r ignored, keeping %r" % (key, value, config[key]))
    return config


def main():
    client = smartx_device.Client.from_bundle(BUNDLE, queue_path=QUEUE, log=print)
    print("SmartX sensor node %s booting" % client.device_id)
    config = load_config()
    print("config: interval %d s, ADC pin %s, LED pin %s"
          % (config["interval_s"], config["adc_pin"], config["led_pin"]))
    adc = machine.ADC(machine.Pin(config["adc_pin"]))
    led = machine.Pin(config["led_pin"], machine.Pin.OUT)
    settings = {"interval_s": config["interval_s"]}

    def report():
        client.report_state({"interval_s": settings["interval_s"], "led": bool(led.value())})

    @client.command("set_interval")
    def set_interval(args):
        seconds = args.get("seconds")
        if not isinstance(seconds, int) or not 1 <= seconds <= 3600:
            raise ValueError("seconds must be an integer from 1 to 3600")
        settings["interval_s"] = seconds
        report()
        return {"interval_s": seconds}

    @client.command("blink")
    def blink(args):
        times = args.get("times", 1)
        if not isinstance(times, int) or not 1 <= times <= 20:
            raise ValueError("times must be an integer from 1 to 20")
        for _ in range(times):
            led.value(1 - led.value())
            sleep_ms(100)
            led.value(1 - led.value())
            sleep_ms(100)
        return {"blinked": times}

    def on_desired(state):
        if "led" in state:
            led.value(1 if state["led"] else 0)
        report()

    client.on_desired_state(on_desired)
    try:
        client.connect()  # prints "connected" through log=print
    except RETRYABLE as error:
        print("hub not reachable yet (%s): keeping readings until it is" % error)
    report()
    last = None
    while True:
        now = monotonic_ms()
        if last is None or now - last >= settings["interval_s"] * 1000:
            last = now
            client.publish("adc", adc.read_u16())
        try:
            client.loop(100)
        except smartx_device.DeviceDisabledError as error:
            print("device disabled on the hub (%s); asking again in a minute" % error)
            sleep_ms(60000)


main()
