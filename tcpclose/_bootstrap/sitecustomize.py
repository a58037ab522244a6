"""Start-up hook of ``tcpclose run`` (see ``tcpclose/_launcher.py``).

``tcpclose run`` puts this directory first on ``PYTHONPATH``, so every Python process
the command starts imports this module at start-up: it applies the policy of
``TCPCLOSE_POLICY`` to the process's servers, then imports the ``sitecustomize`` it
shadows. An interpreter without tcpclose runs as if this file were not here.
"""

try:
    from tcpclose._launcher import bootstrap
except ImportError:  # another interpreter, without tcpclose: nothing to do
    pass
else:
    bootstrap()
