//! Which fields a resource carries, read from its protobuf encoding before
//! it is decoded. prost skips fields it does not know, which is right for
//! most of what istiod sends but wrong for authorization: a match field
//! Weir cannot see would silently match everyone. A closed schema refuses
//! any field outside it; an open one (the workload API) lets unknown fields
//! pass and refuses only those it names, naming the field.
use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};

/// The fields of one message that Weir reads. A field listed with a reason
/// is known but refused; one listed with a child is checked inside too.
pub struct Schema {
    pub message: &'static str,
    /// Fields outside `fields` pass (they are skipped when decoded).
    pub open: bool,
    pub fields: &'static [Field],
}

pub struct Field {
    pub number: u32,
    pub name: &'static str,
    pub kind: Kind,
}

pub enum Kind {
    /// Read as decoded.
    Read,
    /// A message whose own fields are checked.
    Message(&'static Schema),
    /// Known, and refused when present.
    Refused(&'static str),
}

const fn read(number: u32, name: &'static str) -> Field {
    Field {
        number,
        name,
        kind: Kind::Read,
    }
}

const fn message(number: u32, name: &'static str, schema: &'static Schema) -> Field {
    Field {
        number,
        name,
        kind: Kind::Message(schema),
    }
}

const fn refused(number: u32, name: &'static str, why: &'static str) -> Field {
    Field {
        number,
        name,
        kind: Kind::Refused(why),
    }
}

/// `istio.security.Authorization`, as istio/ztunnel's `proto/` carries it.
pub static AUTHORIZATION: Schema = Schema {
    message: "Authorization",
    open: false,
    fields: &[
        read(1, "name"),
        read(2, "namespace"),
        read(3, "scope"),
        read(4, "action"),
        message(5, "rules", &RULE),
        read(6, "dry_run"),
        refused(7, "extensions", "Weir runs no authorization extensions"),
    ],
};

static RULE: Schema = Schema {
    message: "Rule",
    open: false,
    fields: &[message(1, "clauses", &CLAUSE)],
};

static CLAUSE: Schema = Schema {
    message: "Clause",
    open: false,
    fields: &[message(2, "matches", &MATCH)],
};

static MATCH: Schema = Schema {
    message: "Match",
    open: false,
    fields: &[
        message(1, "namespaces", &STRING_MATCH),
        message(2, "not_namespaces", &STRING_MATCH),
        message(3, "principals", &STRING_MATCH),
        message(4, "not_principals", &STRING_MATCH),
        message(5, "source_ips", &ADDRESS),
        message(6, "not_source_ips", &ADDRESS),
        message(7, "destination_ips", &ADDRESS),
        message(8, "not_destination_ips", &ADDRESS),
        read(9, "destination_ports"),
        read(10, "not_destination_ports"),
        message(11, "service_accounts", &SERVICE_ACCOUNT_MATCH),
        message(12, "not_service_accounts", &SERVICE_ACCOUNT_MATCH),
        refused(13, "extensions", "Weir runs no authorization extensions"),
    ],
};

static STRING_MATCH: Schema = Schema {
    message: "StringMatch",
    open: false,
    fields: &[
        read(1, "exact"),
        read(2, "prefix"),
        read(3, "suffix"),
        read(4, "presence"),
    ],
};

static ADDRESS: Schema = Schema {
    message: "Address",
    open: false,
    fields: &[read(1, "address"), read(2, "length")],
};

static SERVICE_ACCOUNT_MATCH: Schema = Schema {
    message: "ServiceAccountMatch",
    open: false,
    fields: &[read(1, "namespace"), read(2, "service_account")],
};

/// `istio.workload.Address`: what istiod may send that Weir would otherwise
/// read as if it were not there.
pub static WORKLOAD_ADDRESS: Schema = Schema {
    message: "Address",
    open: true,
    fields: &[message(2, "service", &SERVICE)],
};

static SERVICE: Schema = Schema {
    message: "Service",
    open: true,
    fields: &[
        message(4, "addresses", &NETWORK_ADDRESS),
        refused(
            13,
            "weighted_waypoints",
            "Weir routes through one waypoint and refuses rather than go around weighted ones",
        ),
        refused(
            14,
            "visibility",
            "Weir cannot enforce a service's visibility and refuses rather than widen it",
        ),
    ],
};

static NETWORK_ADDRESS: Schema = Schema {
    message: "NetworkAddress",
    open: true,
    fields: &[refused(
        3,
        "length",
        "a VIP range (an address with a length) is not supported",
    )],
};

/// Refuses `bytes` when they carry a field outside `schema` (at any depth
/// the schema describes) or a refused one. The error names the path, as
/// `Authorization.rules.clauses.matches: field 14 is not known to Weir`.
pub fn check(bytes: &[u8], schema: &Schema) -> Result<(), String> {
    check_at(bytes, schema, schema.message)
}

fn check_at(mut bytes: &[u8], schema: &Schema, path: &str) -> Result<(), String> {
    while !bytes.is_empty() {
        let (number, wire_type) =
            decode_key(&mut bytes).map_err(|e| format!("{path}: undecodable: {e}"))?;
        let Some(field) = schema.fields.iter().find(|field| field.number == number) else {
            if schema.open {
                skip_field(wire_type, number, &mut bytes, DecodeContext::default())
                    .map_err(|e| format!("{path}: undecodable: {e}"))?;
                continue;
            }
            return Err(format!(
                "{path}: field {number} is not known to Weir, which refuses what it cannot enforce"
            ));
        };
        match (&field.kind, wire_type) {
            (Kind::Refused(why), _) => {
                return Err(format!("{path}.{}: {why}", field.name));
            }
            (Kind::Message(child), WireType::LengthDelimited) => {
                let len = prost::encoding::decode_varint(&mut bytes)
                    .map_err(|e| format!("{path}.{}: undecodable: {e}", field.name))?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= bytes.len())
                    .ok_or_else(|| format!("{path}.{}: truncated", field.name))?;
                let (inner, rest) = bytes.split_at(len);
                check_at(inner, child, &format!("{path}.{}", field.name))?;
                bytes = rest;
            }
            _ => skip_field(wire_type, number, &mut bytes, DecodeContext::default())
                .map_err(|e| format!("{path}.{}: undecodable: {e}", field.name))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::xds::proto::istio::security;

    fn policy_with_match(m: security::Match) -> Vec<u8> {
        security::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            groups: vec![security::Group {
                rules: vec![security::Rules { matches: vec![m] }],
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Appends a field the generated types do not have to the first match.
    fn with_unknown_match_field(number: u32) -> Vec<u8> {
        let mut m = security::Match {
            destination_ports: vec![80],
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::string::encode(number, &"x".to_string(), &mut m);
        let rules = {
            let mut rules = Vec::new();
            prost::encoding::bytes::encode(2, &m, &mut rules);
            rules
        };
        let group = {
            let mut group = Vec::new();
            prost::encoding::bytes::encode(1, &rules, &mut group);
            group
        };
        let mut policy = security::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(5, &group, &mut policy);
        policy
    }

    #[test]
    fn known_fields_pass_at_every_depth() {
        let bytes = policy_with_match(security::Match {
            principals: vec![security::StringMatch {
                match_type: Some(security::string_match::MatchType::Exact("a".into())),
            }],
            service_accounts: vec![security::ServiceAccountMatch {
                namespace: "ns".into(),
                service_account: "sa".into(),
            }],
            source_ips: vec![security::Address {
                address: vec![10, 0, 0, 1],
                length: 32,
            }],
            destination_ports: vec![80, 443],
            ..Default::default()
        });
        check(&bytes, &AUTHORIZATION).expect("all known");
    }

    #[test]
    fn an_unknown_or_refused_field_is_named_with_its_path() {
        let error = check(&with_unknown_match_field(14), &AUTHORIZATION).expect_err("unknown");
        assert_eq!(
            error,
            "Authorization.rules.clauses.matches: field 14 is not known to Weir, which refuses what it cannot enforce"
        );
        let error = check(&with_unknown_match_field(13), &AUTHORIZATION).expect_err("refused");
        assert_eq!(
            error,
            "Authorization.rules.clauses.matches.extensions: Weir runs no authorization extensions"
        );
    }

    /// The workload API lets unknown fields pass, and refuses the ones
    /// that would make Weir go around a waypoint, widen a service or read a
    /// range as one address.
    #[test]
    fn the_workload_api_refuses_only_what_it_names() {
        use crate::xds::proto::istio::workload;
        let service = |extra: &[(u32, &str)], vip_length: Option<u32>| {
            let mut s = workload::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                ..Default::default()
            }
            .encode_to_vec();
            let mut vip = workload::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
            }
            .encode_to_vec();
            if let Some(length) = vip_length {
                prost::encoding::uint32::encode(3, &length, &mut vip);
            }
            prost::encoding::bytes::encode(4, &vip, &mut s);
            for (number, value) in extra {
                prost::encoding::string::encode(*number, &value.to_string(), &mut s);
            }
            let mut address = Vec::new();
            prost::encoding::bytes::encode(2, &s, &mut address);
            address
        };
        check(&service(&[(99, "future")], None), &WORKLOAD_ADDRESS).expect("unknown passes");
        for (bytes, expected) in [
            (
                service(&[(13, "w")], None),
                "Address.service.weighted_waypoints",
            ),
            (service(&[(14, "v")], None), "Address.service.visibility"),
            (service(&[], Some(24)), "Address.service.addresses.length"),
        ] {
            let error = check(&bytes, &WORKLOAD_ADDRESS).expect_err(expected);
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = policy_with_match(security::Match {
            destination_ports: vec![80],
            ..Default::default()
        });
        for end in 0..bytes.len() {
            let _ = check(&bytes[..end], &AUTHORIZATION);
        }
    }
}
