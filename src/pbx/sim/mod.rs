//! An in-process fake Asterisk (ARI websocket + REST on 127.0.0.1:0) with scripted callers.
