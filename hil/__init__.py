"""hil: the SmartX hardware-in-the-loop pytest plugin and suite (docs/hil.md).

Public API:
- the plugin (``hil.plugin``, registered through the ``pytest11`` entry point ``smartx_hil``):
  ``--board sim|URL``, the fixtures ``board``, ``boards``, ``hub``, ``gateway``, ``fault_plan``,
  ``hil_lab``, and the markers ``sim_only``, ``hardware_only``, ``boards(n)``;
- ``hil.boards.HilBoard`` (``expect``, ``send_line``, ``reset``, ``power_cycle``,
  ``load_firmware``, ``status``, ``paused``, ``install_faults``), ``SimBackend``,
  ``SerialBackend``, ``BackendUnsupported``;
- ``hil.hub.HilHub`` (a hub on loopback with enrolment helpers), ``hil.lab.Lab``,
  ``hil.lab.HilGateway``, ``hil.relay.BoardRelay``, ``hil.link.BoardPort``,
  ``hil.console.ConsoleBuffer``/``Expected``/``ExpectTimeout``;
- ``hil/firmware/main.py``: the HIL node firmware (MicroPython), and ``python -m hil.measure``.
Nothing in the product imports this package.
"""
