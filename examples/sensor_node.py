# SmartX sensor node: MicroPython firmware. Copy this file (as main.py), the smartx_device
# package and the device's credentials bundle (device.smartx.json) onto the board's flash.
# It runs unchanged on a board and on the simulator (which provides `machine`).
#
# Every INTERVAL_S seconds it reads an ADC pin and publishes the value on stream "adc".
# Commands: set_interval {"seconds": N}, blink {"times": N}. Desired state: {"led": true|false}.
# Readings made while the hub is away wait in queue.log on flash and are sent when it is back.
import machine

import smartx_device
from smartx_device.clock import monotonic_ms, sleep_ms

BUNDLE = "device.smartx.json"
QUEUE = "queue.log"
SENSOR_PIN = 26
LED_PIN = 25
INTERVAL_S = 10
RETRYABLE = (smartx_device.HubUnreachableError, smartx_device.ConnectionLostError,
             smartx_device.RateLimitedError, smartx_device.TokenExpiredError)


def main():
    client = smartx_device.Client.from_bundle(BUNDLE, queue_path=QUEUE, log=print)
    print("SmartX sensor node %s booting" % client.device_id)
    adc = machine.ADC(machine.Pin(SENSOR_PIN))
    led = machine.Pin(LED_PIN, machine.Pin.OUT)
    settings = {"interval_s": INTERVAL_S}

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
