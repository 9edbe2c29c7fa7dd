"""The HTTP connection layer under the API: uvicorn's h11 protocol with a deadline for the
request head, a cap on open connections, and the server's JSON errors for what uvicorn would
answer in plain text (``protocol.py``); the cap sized to the file-descriptor limit
(``connections.py``)."""
