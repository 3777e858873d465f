//! The OpenAPI 3.1 document of the request-node API, served at `/switchboard/v1/openapi.json`.
//!
//! Invariant: it lists exactly the routes of [`super::routes`] (a test compares both).

use serde_json::{json, Value};

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn answer(description: &str) -> Value {
    json!({
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Variables"}},
            "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/Variables"}},
            "text/plain": {"schema": {"type": "string", "description": "One `name=value` per line."}}
        }
    })
}

fn format_param() -> Value {
    json!({
        "name": "format", "in": "query", "required": false,
        "description": "How the answer is written: `json`, `form` (application/x-www-form-urlencoded) or `text` (`name=value` lines). Without it the `Accept` header decides; JSON by default.",
        "schema": {"type": "string", "enum": ["json", "form", "text"]}
    })
}

fn id_param() -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "description": "The verification id (`callgate_ref` of the start answer).",
        "schema": {"type": "string"}
    })
}

pub fn document() -> Value {
    let e400 = error("A malformed request, a queue this switchboard may not use, or the number in the URL (`bad_request`).");
    let e401 = error("No bearer token, or not a switchboard's (`unauthorized`).");
    let e404 = error("No such verification of this switchboard (`not_found`).");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "callgate request-node API for hosted switchboards",
            "version": "1",
            "description": "Called by a hosted switchboard's IVR (HTTP request nodes): start a verification with the number the caller typed, long-poll its status, cancel it when the caller hangs up. Every route but this document needs the switchboard's `Authorization: Bearer <token>`. Answers are flat string variables to route on and to show in a call widget. The personal number is only ever sent in the start request's body."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/switchboard/v1/verifications": {
                "post": {
                    "summary": "Start a verification (idempotent per call id and attempt)",
                    "description": "Answers at once: `pending` with the verification id, or `failed`/`invalid_number` with nothing started. A retried node (same `call_id` and `attempt`) gets the same verification, also on another instance sharing state.",
                    "parameters": [format_param()],
                    "requestBody": {
                        "required": true,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/StartRequest"}},
                            "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/StartRequest"}}
                        }
                    },
                    "responses": {
                        "200": answer("The verification's variables."),
                        "400": e400, "401": e401,
                        "413": error("The body is larger than `api.max_body` (`body_too_large`)."),
                        "503": error("callgate is draining (`unavailable`).")
                    }
                }
            },
            "/switchboard/v1/verifications/{id}": {
                "get": {
                    "summary": "A verification's status, optionally waiting for a change or its end",
                    "parameters": [
                        id_param(),
                        {"name": "wait", "in": "query", "required": false,
                         "description": "Seconds to wait (at most 25) before answering.",
                         "schema": {"type": "integer", "minimum": 0}},
                        {"name": "until", "in": "query", "required": false,
                         "description": "`change` (default): answer at the first change; `final`: only once it is over (or `wait` passed).",
                         "schema": {"type": "string", "enum": ["change", "final"]}},
                        format_param()
                    ],
                    "responses": {
                        "200": answer("The verification's variables."),
                        "400": e400, "401": e401, "404": e404
                    }
                }
            },
            "/switchboard/v1/verifications/{id}/cancel": {
                "post": {
                    "summary": "The caller hung up: cancel the order",
                    "description": "The verification ends `failed`/`caller_hung_up`; answers its final variables (waits up to 5 s for them).",
                    "parameters": [id_param(), format_param()],
                    "responses": {
                        "200": answer("The verification's variables."),
                        "400": e400, "401": e401, "404": e404,
                        "503": error("Several instances: the instance running the verification did not answer the forwarded cancel (`instance_unavailable`).")
                    }
                }
            },
            "/switchboard/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "StartRequest": {
                    "type": "object",
                    "required": ["call_id", "queue", "number"],
                    "properties": {
                        "call_id": {"type": "string", "maxLength": 128, "description": "The switchboard's call id (the one its call-event feed uses)."},
                        "queue": {"type": "string", "description": "A callgate queue this switchboard may use (`[switchboards.<name>] queues`)."},
                        "number": {"type": "string", "description": "The personal number as typed (a trailing `#` is dropped)."},
                        "caller": {"type": "string", "maxLength": 128, "description": "The caller's line (abuse limits only)."},
                        "language": {"type": "string", "description": "One of the queue's languages."},
                        "attempt": {"type": "string", "description": "0–99 (a number is accepted in JSON): a new attempt after a failure starts a new verification.", "default": "0"}
                    }
                },
                "Variables": {
                    "type": "object",
                    "required": ["verification_id", "callgate_status", "callgate_reason", "callgate_ref", "callgate_stage"],
                    "properties": {
                        "verification_id": {"type": "string", "description": "Empty when nothing was started."},
                        "callgate_status": {"type": "string", "enum": ["pending", "verified", "failed", "unavailable", "interrupted"]},
                        "callgate_reason": {"type": "string", "description": "Empty unless failed or unavailable (e.g. `invalid_number`, `user_cancelled`, `caller_hung_up`)."},
                        "callgate_ref": {"type": "string"},
                        "callgate_stage": {"type": "string", "enum": ["starting", "order_created", "awaiting_app", "confirming_call", "identifying", "done"]},
                        "callgate_method": {"type": "string"},
                        "callgate_at": {"type": "string"},
                        "callgate_name": {"type": "string", "description": "Only if the queue's `disclose` allows it."},
                        "callgate_number_masked": {"type": "string", "description": "Only if the queue's `disclose` allows it."},
                        "callgate_pseudonym": {"type": "string", "description": "Only if the queue's `disclose` allows it."}
                    },
                    "additionalProperties": {"type": "string"}
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "reason"],
                    "properties": {
                        "error": {"type": "string", "enum": ["bad_request", "unauthorized", "not_found", "body_too_large", "unavailable", "instance_unavailable", "internal"]},
                        "reason": {"type": "string"}
                    }
                }
            }
        }
    })
}
