//! The OpenAPI 3.1 document of the agent API, served at `/v1/openapi.json`.
//!
//! Invariant: it lists exactly the routes of [`super::routes`] (a test compares both and sends a
//! request to each documented route).

use serde_json::{json, Value};

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn sse(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"text/event-stream": {"schema": {"type": "string"}}}
    })
}

fn id_param(what: &str) -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "description": what,
        "schema": {"type": "string"}
    })
}

fn queue_param() -> Value {
    json!({
        "name": "queue", "in": "query", "required": false,
        "description": "Only calls of this queue.",
        "schema": {"type": "string"}
    })
}

pub fn document() -> Value {
    let call_id = id_param(
        "callgate's call id (the caller's channel id) or an alias: the Asterisk linkedid or an agent leg's channel id.",
    );
    let e401 = error("No bearer token, or an unknown one (`WWW-Authenticate: Bearer`).");
    let e403 = error("The token's role may not do this, or the call is another agent's.");
    let e404 = error("No such call (`not_found`, `call_ended`).");
    let e422 = error("An unknown query parameter or an invalid id.");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "callgate agent API",
            "version": "1",
            "description": "Calls in progress, identity checks on them and their live progress. Every route but this document needs `Authorization: Bearer <token>`. Errors are `{\"error\": code, \"reason\": text}`. Times are RFC 3339 UTC. A personal number is only ever sent in a POST body."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/calls": {
                "get": {
                    "summary": "Calls in progress the token may see: an agent's own calls; every call for supervisors and ops.",
                    "parameters": [queue_param()],
                    "responses": {
                        "200": ok("The calls, oldest first.", "CallList"),
                        "401": e401, "422": e422
                    }
                }
            },
            "/v1/calls/{id}": {
                "get": {
                    "summary": "One call in progress with its current or last verification.",
                    "parameters": [call_id],
                    "responses": {
                        "200": ok("The call.", "Call"),
                        "401": e401, "403": e403, "404": e404, "422": e422
                    }
                }
            },
            "/v1/calls/{id}/verifications": {
                "post": {
                    "summary": "Start a verification on a call with an agent: collect the number on the caller's keypad, or check the number the caller told the agent. A check in progress is superseded. Roles agent (own calls) and supervisor.",
                    "parameters": [call_id],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StartRequest"}}}
                    },
                    "responses": {
                        "202": ok("Started; follow it on the call's stream or by its id (also in `Location`).", "Accepted"),
                        "401": e401, "403": e403,
                        "404": error("No such call, or it ended (`not_found`, `call_ended`)."),
                        "409": error("The call is not with an agent (`not_with_agent`), or `collect: keypad` was asked for on a hosted switchboard's call, whose audio callgate does not handle (`keypad_unavailable`: type the number instead)."),
                        "413": error("The body is larger than `api.max_body` (`body_too_large`)."),
                        "422": error("The body is not one of the two forms (`invalid_request`), or the number is not a valid personal number for the queue (`invalid_number`)."),
                        "503": error("The call did not answer in time (`call_unavailable`), the instance owning it did not answer (`instance_unavailable`, shared state only), or callgate is draining (`unavailable`).")
                    }
                }
            },
            "/v1/calls/{id}/verification": {
                "delete": {
                    "summary": "Cancel the verification in progress (reason `agent_cancelled`). Roles agent (own calls) and supervisor.",
                    "parameters": [call_id],
                    "responses": {
                        "202": ok("Being cancelled.", "Accepted"),
                        "401": e401, "403": e403, "404": e404,
                        "409": error("No verification in progress (`nothing_to_cancel`) or the call is not with an agent (`not_with_agent`)."),
                        "422": e422,
                        "503": error("The call did not answer in time (`call_unavailable`), or the instance owning it did not answer (`instance_unavailable`, shared state only).")
                    }
                }
            },
            "/v1/calls/{id}/events": {
                "get": {
                    "summary": "Server-Sent Events of one call: a `snapshot` of its current state, then `agent_connected`, `verification_progress`, `verification_completed`, `fraud_warning`, `instance_lost` (shared state only) and `call_ended`, each with the call (schema Call) as data. After a gap the client gets a `snapshot` again. Ends after `call_ended`.",
                    "parameters": [call_id],
                    "responses": {
                        "200": sse("The stream."),
                        "401": e401, "403": e403, "404": e404, "422": e422
                    }
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "Server-Sent Events of every call the token may see: one `snapshot` per call, then `snapshot_complete` (data `{\"calls\": n}`), then `call_started`, `agent_connected`, `verification_progress`, `verification_completed`, `fraud_warning`, `instance_lost` (shared state only) and `call_ended`, each with the call (schema Call) as data. After a gap the snapshots are sent again and replace the client's state. An agent's calls appear from `agent_connected` on.",
                    "parameters": [queue_param()],
                    "responses": {
                        "200": sse("The stream."),
                        "401": e401, "422": e422
                    }
                }
            },
            "/v1/verifications/{id}": {
                "get": {
                    "summary": "A verification by id (`CALLGATE_REF`), while its call is in progress and for `api.keep_verifications` after it ended. Agents read only verifications of calls that were theirs.",
                    "parameters": [id_param("The verification id.")],
                    "responses": {
                        "200": ok("The verification.", "Verification"),
                        "401": e401, "403": e403,
                        "404": error("Unknown, or forgotten (`not_found`)."),
                        "422": e422
                    }
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A token whose SHA-256 is configured under `[api.tokens.<name>]`."}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "reason"],
                    "properties": {
                        "error": {"type": "string", "enum": [
                            "unauthorized", "forbidden", "not_found", "no_route", "method_not_allowed",
                            "body_too_large", "invalid_request", "bad_request", "not_with_agent",
                            "call_ended", "invalid_number", "nothing_to_cancel", "call_unavailable",
                            "keypad_unavailable", "instance_unavailable", "unavailable", "internal"
                        ]},
                        "reason": {"type": "string"}
                    }
                },
                "StartRequest": {
                    "description": "Exactly one of the two.",
                    "oneOf": [
                        {"type": "object", "required": ["collect"], "additionalProperties": false,
                         "properties": {"collect": {"const": "keypad"}}},
                        {"type": "object", "required": ["number"], "additionalProperties": false,
                         "properties": {"number": {"type": "string", "maxLength": 32, "description": "The personal number the caller told the agent."}}}
                    ]
                },
                "Accepted": {
                    "type": "object",
                    "required": ["verification_id", "call_id", "status", "links"],
                    "properties": {
                        "verification_id": {"type": "string"},
                        "call_id": {"type": "string"},
                        "status": {"type": "string", "enum": ["in_progress", "cancelling"]},
                        "links": {"type": "object", "additionalProperties": {"type": "string"}}
                    }
                },
                "CallList": {
                    "type": "object",
                    "required": ["calls"],
                    "properties": {"calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}}}
                },
                "Call": {
                    "type": "object",
                    "required": ["call_id", "queue", "state", "agent", "aliases", "started_at", "can_verify", "keypad", "verification", "links"],
                    "properties": {
                        "call_id": {"type": "string"},
                        "queue": {"type": "string"},
                        "state": {"type": "string", "enum": ["gate", "waiting_for_agent", "talking", "ended"]},
                        "agent": {"type": ["string", "null"], "description": "The agent's interface (MEMBERINTERFACE), once an agent answered."},
                        "aliases": {"type": "array", "items": {"type": "string"}},
                        "started_at": {"type": "string", "format": "date-time"},
                        "can_verify": {"type": "boolean"},
                        "keypad": {"type": "boolean", "description": "Whether a check may collect the number on the caller's keypad (`{\"collect\": \"keypad\"}`): callgate handles the call's audio. False on a hosted switchboard's call: type the number instead."},
                        "verification": {"oneOf": [{"$ref": "#/components/schemas/Verification"}, {"type": "null"}]},
                        "links": {"type": "object", "additionalProperties": {"type": "string"}},
                        "instance": {"type": "string", "description": "Only with shared state ([state] kind = \"redis\"): the callgate instance that owns the call. Any instance answers for it."},
                        "instance_lost": {"type": "boolean", "description": "Only with shared state: the owning instance stopped beating; the call is no longer followed (its PBX's dialplan routes the caller)."}
                    }
                },
                "Verification": {
                    "type": "object",
                    "required": ["verification_id", "call_id", "queue", "idp", "method", "started_by", "started_at", "ended_at", "stage", "stages", "status", "reason", "limit", "word_pair", "fraud", "fields", "links"],
                    "properties": {
                        "verification_id": {"type": "string"},
                        "call_id": {"type": "string"},
                        "queue": {"type": "string"},
                        "idp": {"type": "string"},
                        "method": {"type": "string", "enum": ["ivr", "keypad", "agent_typed"]},
                        "started_by": {"type": "string", "description": "`gate`, `agent_keys` or `api:<token name>`."},
                        "started_at": {"type": "string", "format": "date-time"},
                        "ended_at": {"type": ["string", "null"], "format": "date-time"},
                        "stage": {"type": ["string", "null"], "enum": ["starting", "order_created", "awaiting_app", "confirming_call", "identifying", "done", null]},
                        "stages": {"type": "array", "items": {"type": "object", "properties": {"stage": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}}},
                        "status": {"type": "string", "enum": ["in_progress", "verified", "failed", "unavailable", "skipped", "interrupted"]},
                        "reason": {"type": ["string", "null"], "description": "The outcome's reason code."},
                        "limit": {"type": ["string", "null"], "enum": ["per_number", "per_line", "per_agent", "per_queue", "cool_down", "per_idp", "concurrent", null], "description": "The abuse limit that refused the check's order (reason `rate_limited`, or `provider_busy` for `per_idp` and `concurrent`); null otherwise."},
                        "word_pair": {"type": ["string", "null"], "description": "Words to read out to the caller so they pick the right request in their app (a CIBA provider's word pair), while the check is in progress; null otherwise."},
                        "fraud": {"type": "boolean", "description": "True for `declined_call`: the person says they are not on a call with us."},
                        "fields": {"type": "object", "additionalProperties": {"type": "string"}, "description": "The result as the queue's disclosure policy renders it: status, reason, ref, method, at, and only the allowed identity fields."},
                        "links": {"type": "object", "additionalProperties": {"type": "string"}}
                    }
                }
            }
        }
    })
}
