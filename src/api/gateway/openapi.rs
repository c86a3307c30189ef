//! The OpenAPI 3 document of the REST gateway, generated from the same
//! compiled routes and descriptors that serve the requests, so that the
//! two cannot disagree. Checked in as `docs/openapi.json`; regenerate with
//! `cargo run -- openapi > docs/openapi.json`.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Value as Json, json};

use super::{BodyMapping, Gateway, Route};

impl Gateway {
    /// The OpenAPI 3.0 document for every REST route.
    pub fn openapi(&self, title: &str, version: &str) -> Json {
        let mut schemas = Schemas::default();
        let mut paths: BTreeMap<String, serde_json::Map<String, Json>> = BTreeMap::new();
        for route in &self.routes {
            let Some(method) = &route.http_method else {
                continue;
            };
            let op = operation(route, &mut schemas);
            paths
                .entry(openapi_path(&route.template_text))
                .or_default()
                .insert(method.as_str().to_ascii_lowercase(), op);
        }
        let mut components = schemas.done();
        components.insert(
            "google.rpc.Status".into(),
            json!({
                "type": "object",
                "description": "An error: `code` is the gRPC code, and the HTTP status is mapped from it.",
                "properties": {
                    "code": {"type": "integer", "format": "int32"},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["code", "message", "details"],
            }),
        );
        json!({
            "openapi": "3.0.3",
            "info": {"title": title, "version": version},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An API key: `Authorization: Bearer uhk_…`.",
                    },
                },
            },
            "security": [{"bearerAuth": []}],
        })
    }
}

/// `/v1/{name=shelves/*}:get` → `/v1/{name}:get`.
fn openapi_path(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut skipping = false;
    for c in template.chars() {
        match c {
            '=' if !skipping && out.rfind('{') > out.rfind('}') => skipping = true,
            '}' => {
                skipping = false;
                out.push(c);
            }
            _ if skipping => {}
            _ => out.push(c),
        }
    }
    out
}

fn operation(route: &Route, schemas: &mut Schemas) -> Json {
    let input = route.method.input();
    let mut parameters = Vec::new();
    for path in &route.path_fields {
        let leaf = path.fields.last().expect("a field path has a field");
        parameters.push(json!({
            "name": path.text,
            "in": "path",
            "required": true,
            "schema": schemas.field(leaf),
        }));
    }
    let bound: BTreeSet<&str> = route
        .path_fields
        .iter()
        .map(|p| p.fields[0].name())
        .collect();
    let mut request_body = None;
    match &route.body {
        BodyMapping::Whole => {
            request_body = Some(json!({
                "required": true,
                "content": {"application/json": {"schema": schemas.message_ref(&input)}},
            }));
        }
        BodyMapping::Field(field) => {
            request_body = Some(json!({
                "content": {"application/json": {"schema": schemas.field(field)}},
            }));
        }
        BodyMapping::None => {}
    }
    if !matches!(route.body, BodyMapping::Whole) {
        for field in input.fields() {
            let in_body = matches!(&route.body, BodyMapping::Field(f) if f.name() == field.name());
            if bound.contains(field.name()) || in_body || field.is_map() {
                continue;
            }
            if matches!(field.kind(), Kind::Message(m) if !super::is_well_known(&m)) {
                continue;
            }
            let mut p = json!({
                "name": field.json_name(),
                "in": "query",
                "schema": schemas.field(&field),
            });
            if field.is_list() {
                p["style"] = json!("form");
                p["explode"] = json!(true);
            }
            parameters.push(p);
        }
    }
    let output = route.method.output();
    let ok = if route.server_streaming {
        json!({
            "description": format!(
                "Server-Sent Events: one `data:` per {} (proto3 JSON); `event: error` with a google.rpc.Status when the stream ends with an error.",
                output.full_name()
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        })
    } else {
        let schema = match &route.response_body {
            Some(field) => schemas.field(field),
            None => schemas.message_ref(&output),
        };
        json!({
            "description": "OK",
            "content": {"application/json": {"schema": schema}},
        })
    };
    let mut op = json!({
        "operationId": route.method.name(),
        "tags": [route.method.parent_service().name()],
        "parameters": parameters,
        "responses": {
            "200": ok,
            "default": {
                "description": "An error (google.rpc.Status).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}},
            },
        },
    });
    if let Some(body) = request_body {
        op["requestBody"] = body;
    }
    op
}

/// The message schemas reached so far.
#[derive(Default)]
struct Schemas {
    done: BTreeMap<String, Json>,
    pending: Vec<MessageDescriptor>,
}

impl Schemas {
    fn message_ref(&mut self, m: &MessageDescriptor) -> Json {
        if let Some(wk) = well_known(m) {
            return wk;
        }
        if !self.done.contains_key(m.full_name()) && !self.pending.iter().any(|p| p == m) {
            self.pending.push(m.clone());
        }
        json!({"$ref": format!("#/components/schemas/{}", m.full_name())})
    }

    /// The schema of one value of a field (an array for a repeated field,
    /// an object for a map).
    fn field(&mut self, f: &FieldDescriptor) -> Json {
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                unreachable!("a map field is a message of entries")
            };
            let value = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": self.single(&value.kind())});
        }
        let one = self.single(&f.kind());
        if f.is_list() {
            json!({"type": "array", "items": one})
        } else {
            one
        }
    }

    /// proto3 JSON: 64-bit integers are strings, enums are names.
    fn single(&mut self, kind: &Kind) -> Json {
        match kind {
            Kind::Double | Kind::Float => json!({"type": "number"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "format": "int32"})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295u64})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
            }
            Kind::Uint64 | Kind::Fixed64 => {
                json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"})
            }
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "format": "byte"}),
            Kind::Enum(e) => {
                let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
                json!({"type": "string", "enum": names})
            }
            Kind::Message(m) => self.message_ref(m),
        }
    }

    fn done(mut self) -> serde_json::Map<String, Json> {
        while let Some(m) = self.pending.pop() {
            let mut properties = serde_json::Map::new();
            for f in m.fields() {
                properties.insert(f.json_name().to_owned(), self.field(&f));
            }
            let mut schema = json!({
                "type": "object",
                "properties": properties,
                "additionalProperties": false,
            });
            let oneofs: Vec<Vec<String>> = m
                .oneofs()
                .filter(|o| !o.is_synthetic())
                .map(|o| o.fields().map(|f| f.json_name().to_owned()).collect())
                .collect();
            if !oneofs.is_empty() {
                schema["description"] = json!(format!(
                    "At most one of each group is set: {}.",
                    oneofs
                        .iter()
                        .map(|g| g.join(" | "))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            self.done.insert(m.full_name().to_owned(), schema);
        }
        self.done.into_iter().collect()
    }
}

/// The proto3 JSON forms of the well-known types in use.
fn well_known(m: &MessageDescriptor) -> Option<Json> {
    Some(match m.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "example": "3600s"})
        }
        "google.protobuf.Empty" => json!({"type": "object", "additionalProperties": false}),
        "google.protobuf.Struct" => json!({"type": "object"}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.FieldMask" => json!({"type": "string"}),
        name if name.starts_with("google.protobuf.") && name.ends_with("Value") => {
            // Wrappers: the wrapped value itself.
            let value = m.get_field_by_name("value")?;
            let mut s = Schemas::default();
            s.single(&value.kind())
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_variable_names_only() {
        assert_eq!(
            openapi_path("/v1/webhooks/{webhook_id}:confirm"),
            "/v1/webhooks/{webhook_id}:confirm"
        );
        assert_eq!(openapi_path("/v1/{name=shelves/*/books/*}"), "/v1/{name}");
    }

    #[test]
    fn the_service_document_has_every_route_and_canonical_types() {
        let g = Gateway::from_descriptors(
            crate::proto::FILE_DESCRIPTOR_SET,
            crate::proto::SERVICE_NAME,
        )
        .unwrap();
        let doc = g.openapi("uploadhook", "v1");
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(
            paths
                .values()
                .map(|p| p.as_object().unwrap().len())
                .sum::<usize>(),
            g.routes.len()
        );
        let confirm = &doc["paths"]["/v1/webhooks/{webhook_id}:confirm"]["post"];
        assert_eq!(confirm["operationId"], "Confirm");
        assert_eq!(confirm["parameters"][0]["in"], "path");
        let webhook = &doc["components"]["schemas"]["uploadhook.v1.Webhook"];
        assert_eq!(webhook["properties"]["size"]["type"], "string");
        assert_eq!(webhook["properties"]["createdAt"]["format"], "date-time");
        assert_eq!(webhook["properties"]["status"]["enum"][1], "STATUS_PENDING");
        assert_eq!(webhook["additionalProperties"], false);
        let stream = &doc["paths"]["/v1/events:stream"]["get"];
        let names: Vec<&str> = stream["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["webhookId", "afterEventId", "types", "statuses"]);
        assert!(stream["responses"]["200"]["content"]["text/event-stream"].is_object());
    }
}
