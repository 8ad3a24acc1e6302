"""``python -m streams``: see streams.cli.

Ctrl-C at any moment must end the process with status 130 (or 0) and no traceback. So the first
thing this does, before the heavy imports (pydantic, websockets, reactivex, the sr25519 bindings),
is take over SIGINT: during the imports a SIGINT is only noted (a KeyboardInterrupt raised in the
middle of a native extension's initialisation can crash the interpreter at exit, and a traceback
is no way to stop), and a noted one exits with 130 once they are done. Then Python's own handler
is back, so ``asyncio.run`` cancels the command on a Ctrl-C as usual (and the CLI turns a
KeyboardInterrupt into 130); while a command runs, its own handlers
(streams.cli.common.run_until_signalled) cancel it cleanly and ignore a second one; once it is
over, SIGINT is ignored, so nothing can interrupt the exit.

(A SIGINT in the interpreter's own startup, before this module runs, is out of its reach.)
"""

import _signal as signal  # the C module: ``signal`` itself builds enums first (slow, interruptible)
import sys

_noted = False


def _note_sigint(signum: int, frame: object) -> None:
    global _noted
    _noted = True


def _run() -> int:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # an inherited "ignore" (nohup, &) stays
        from streams.cli import main

        return main()
    signal.signal(signal.SIGINT, _note_sigint)
    import bittensor_wallet  # noqa: F401 - imported here, under the noting handler (see above)

    import streams.client  # noqa: F401
    from streams.cli import main

    if _noted:
        return 130
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    try:
        status = _run()
    except KeyboardInterrupt:
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing may interrupt the interpreter's exit
    sys.exit(status)
