//! Option negotiation (the fixed newstyle handshake): the greeting, then options until the
//! client picks an export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`), gives up, or starts TLS
//! (`NBD_OPT_STARTTLS`: the caller wraps the stream and negotiates again from scratch, over
//! TLS). With TLS required, nothing but STARTTLS and ABORT is answered in clear.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{io_err, protocol_error, SelectedContext, BASE_ALLOCATION_ID};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::backend::{BlockSizes, ExportBackend};
use crate::nbd::codec::*;
use crate::nbd::shared::ServerState;
use crate::nbd::tls::{PeerIdentity, TlsMode};

/// Option data larger than this is not a real client; the connection is closed.
const MAX_OPTION_DATA: u32 = 64 << 10;

/// What option negotiation settled on.
pub(super) struct Negotiated {
    pub(super) name: String,
    pub(super) backend: Arc<dyn ExportBackend>,
    pub(super) flags: u16,
    pub(super) structured: bool,
    pub(super) base_allocation: bool,
    /// Who the client proved to be over TLS (`None`: in clear).
    pub(super) identity: Option<PeerIdentity>,
    /// The export's other contexts the client selected.
    pub(super) contexts: Vec<SelectedContext>,
}

/// How a round of option negotiation ended.
pub(super) enum Outcome {
    Export(Negotiated),
    /// The client ended negotiation without choosing an export.
    NoExport,
    /// STARTTLS was acknowledged: the TLS handshake comes next, then negotiation starts over.
    StartTls,
}

/// Negotiation state across options.
struct Options<'a> {
    shared: &'a ServerState,
    structured: bool,
    /// The TLS peer, once TLS is up: the export source lists and opens exports for it.
    identity: Option<&'a PeerIdentity>,
    /// What the last SET_META_CONTEXT selected, if anything.
    meta: Option<MetaSelection>,
}

/// The metadata contexts one SET_META_CONTEXT selected, valid only for its export.
struct MetaSelection {
    export: String,
    base_allocation: bool,
    contexts: Vec<SelectedContext>,
}

/// Who a client in clear is to the export source.
static ANONYMOUS: PeerIdentity = PeerIdentity::Anonymous;

impl Options<'_> {
    /// Who the client is to the export source: what TLS proved, or no one.
    fn peer(&self) -> &PeerIdentity {
        self.identity.unwrap_or(&ANONYMOUS)
    }

    /// The export a client name refers to ("" means the default export).
    fn resolve(&self, name: &str) -> Result<(String, Arc<dyn ExportBackend>)> {
        let name = if name.is_empty() {
            match self.shared.source.default_export(self.peer()) {
                Some(d) => d,
                None => return Err(Error::new(ErrorKind::NotFound, "no default export")),
            }
        } else {
            name.to_owned()
        };
        let backend = self.shared.source.open(&name, self.peer())?;
        Ok((name, backend))
    }

    fn transmission_flags(&self, backend: &dyn ExportBackend) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_FAST_ZERO
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if backend.read_only() {
            flags |= TFLAG_READ_ONLY;
        }
        if self.structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }

    fn negotiated(&self, name: String, backend: Arc<dyn ExportBackend>) -> Negotiated {
        let flags = self.transmission_flags(backend.as_ref());
        let meta = (self.meta.as_ref()).filter(|m| self.structured && m.export == name);
        Negotiated {
            base_allocation: meta.is_some_and(|m| m.base_allocation),
            contexts: meta.map(|m| m.contexts.clone()).unwrap_or_default(),
            name,
            backend,
            flags,
            structured: self.structured,
            identity: self.identity.cloned(),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, reply: OptionReply) -> Result<()> {
    stream
        .write_all(&reply.encode())
        .await
        .map_err(io_err("sending option reply"))
}

/// The greeting and the client's flags; whether the client asked for no zeroes comes back.
pub(super) async fn greet<S>(stream: &mut S) -> Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await
        .map_err(io_err("sending greeting"))?;
    let mut buf = [0u8; 4];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(io_err("reading client flags"))?;
    let client_flags = decode_client_flags(&buf)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return protocol_error(format!("unknown client flags {client_flags:#x}"));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Fixed newstyle option negotiation, in clear (`identity` `None`) or over TLS. Every round
/// starts from no state: what was negotiated before STARTTLS does not carry over.
pub(super) async fn negotiate<S>(
    stream: &mut S,
    peer: &str,
    shared: &ServerState,
    no_zeroes: bool,
    identity: Option<&PeerIdentity>,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls_mode = shared.tls.as_ref().map(|t| t.mode());
    let tls_required = tls_mode == Some(TlsMode::Require) && identity.is_none();
    let mut opts = Options {
        shared,
        structured: false,
        identity,
        meta: None,
    };

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        stream
            .read_exact(&mut hdr)
            .await
            .map_err(io_err("reading option"))?;
        let header = OptionHeader::decode(&hdr)?;
        if header.length > MAX_OPTION_DATA {
            return protocol_error(format!("option data of {} bytes", header.length));
        }
        let mut data = vec![0u8; header.length as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(io_err("reading option data"))?;
        let option = header.option;
        if option == OPT_STARTTLS && tls_mode.is_some() {
            let refusal = if identity.is_some() {
                Some("TLS is already on")
            } else if !data.is_empty() {
                Some("STARTTLS takes no data")
            } else {
                None
            };
            match refusal {
                Some(msg) => send(stream, OptionReply::error(option, REP_ERR_INVALID, msg)).await?,
                None => {
                    send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
                    return Ok(Outcome::StartTls);
                }
            }
            continue;
        }
        if tls_required && option != OPT_ABORT {
            debug!(%peer, option, "option before STARTTLS refused: TLS is required");
            if option == OPT_EXPORT_NAME {
                // No error reply exists for it: the session ends.
                return protocol_error("NBD_OPT_EXPORT_NAME before STARTTLS: TLS is required");
            }
            let msg = "TLS is required: start it with NBD_OPT_STARTTLS";
            send(stream, OptionReply::error(option, REP_ERR_TLS_REQD, msg)).await?;
            continue;
        }
        let request = match OptionRequest::decode(option, &data) {
            Ok(r) => r,
            Err(e) if option == OPT_EXPORT_NAME => return Err(e),
            Err(e) => {
                debug!(%peer, option, error = %e, "malformed option");
                send(
                    stream,
                    OptionReply::error(option, REP_ERR_INVALID, e.context()),
                )
                .await?;
                continue;
            }
        };
        debug!(%peer, ?request, "option");
        match request {
            OptionRequest::ExportName(name) => {
                // This option has no error reply: an unknown name can only be a hang-up.
                let (name, backend) = match opts.resolve(&name) {
                    Ok(found) => found,
                    Err(e) => {
                        debug!(%peer, error = %e, "EXPORT_NAME for unknown export");
                        return Ok(Outcome::NoExport);
                    }
                };
                let n = opts.negotiated(name, backend);
                let reply = encode_export_name_reply(n.backend.size(), n.flags, no_zeroes);
                stream
                    .write_all(&reply)
                    .await
                    .map_err(io_err("sending export info"))?;
                return Ok(Outcome::Export(n));
            }
            OptionRequest::Abort => {
                // The client may already be gone; the ACK is a courtesy.
                let _ = send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await;
                return Ok(Outcome::NoExport);
            }
            OptionRequest::List => {
                for e in shared.source.list(opts.peer()) {
                    let kind = OptionReplyKind::Server {
                        name: e.name,
                        description: e.description,
                    };
                    send(stream, OptionReply::new(option, kind)).await?;
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::StructuredReply => {
                opts.structured = true;
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::Info { go, name, requests } => {
                let (name, backend) = match opts.resolve(&name) {
                    Ok(found) => found,
                    Err(e) => {
                        let code = match e.kind() {
                            ErrorKind::NotFound => REP_ERR_UNKNOWN,
                            _ => REP_ERR_PLATFORM,
                        };
                        send(stream, OptionReply::error(option, code, e.to_string())).await?;
                        continue;
                    }
                };
                for info in info_replies(&opts, &name, backend.as_ref(), &requests) {
                    send(
                        stream,
                        OptionReply::new(option, OptionReplyKind::Info(info)),
                    )
                    .await?;
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
                if go {
                    return Ok(Outcome::Export(opts.negotiated(name, backend)));
                }
            }
            OptionRequest::MetaContext {
                set,
                export,
                queries,
            } => {
                // A SET replaces the selection even when it fails.
                if set {
                    opts.meta = None;
                }
                if set && !opts.structured {
                    let msg = "SET_META_CONTEXT needs structured replies first";
                    send(stream, OptionReply::error(option, REP_ERR_INVALID, msg)).await?;
                    continue;
                }
                let (name, backend) = match opts.resolve(&export) {
                    Ok(found) => found,
                    Err(e) => {
                        send(
                            stream,
                            OptionReply::error(option, REP_ERR_UNKNOWN, e.to_string()),
                        )
                        .await?;
                        continue;
                    }
                };
                let offered = backend.meta_contexts();
                let selection = select_contexts(set, &queries, &offered);
                for (id, context) in &selection.contexts {
                    let kind = OptionReplyKind::MetaContext {
                        id: *id,
                        name: context.clone(),
                    };
                    send(stream, OptionReply::new(option, kind)).await?;
                }
                if set {
                    opts.meta = Some(MetaSelection {
                        export: name,
                        base_allocation: selection.base_allocation,
                        contexts: (selection.contexts.into_iter())
                            .filter(|(_, c)| c != META_BASE_ALLOCATION)
                            .map(|(id, name)| SelectedContext { id, name })
                            .collect(),
                    });
                }
                send(stream, OptionReply::new(option, OptionReplyKind::Ack)).await?;
            }
            OptionRequest::Unknown { option, .. } => {
                let msg = format!("option {option} is not supported");
                send(stream, OptionReply::error(option, REP_ERR_UNSUP, msg)).await?;
            }
        }
    }
}

/// The contexts a LIST or SET query list names, with the ids to reply with.
struct Selection {
    base_allocation: bool,
    /// `base:allocation` first when named; no name twice.
    contexts: Vec<(u32, String)>,
}

/// Which of `base:allocation` and the export's `offered` contexts a LIST (`set == false`) or
/// SET query list names. SET takes exact names; LIST also takes a namespace ("qemu:",
/// "base") or a prefix ending in a colon ("qemu:dirty-bitmap:"), and an empty list means
/// everything (for SET, nothing). Names nobody offers are ignored, as the protocol asks.
///
/// SET gives `base:allocation` its fixed id and the others ids in order after it; LIST gives
/// the others id 0, the value the protocol reserves there (clients disregard LIST ids).
fn select_contexts(set: bool, queries: &[String], offered: &[String]) -> Selection {
    let names = |context: &str| {
        if queries.is_empty() {
            return !set;
        }
        queries.iter().any(|q| {
            q == context
                || (!set
                    && context
                        .strip_prefix(q.as_str())
                        .is_some_and(|rest| q.ends_with(':') || rest.starts_with(':')))
        })
    };
    let mut selection = Selection {
        base_allocation: names(META_BASE_ALLOCATION),
        contexts: Vec::new(),
    };
    if selection.base_allocation {
        (selection.contexts).push((BASE_ALLOCATION_ID, META_BASE_ALLOCATION.to_owned()));
    }
    let mut next_id = BASE_ALLOCATION_ID;
    for context in offered {
        let seen = selection.contexts.iter().any(|(_, c)| c == context);
        if context != META_BASE_ALLOCATION && !seen && names(context) {
            let id = if set {
                next_id += 1;
                next_id
            } else {
                0
            };
            selection.contexts.push((id, context.clone()));
        }
    }
    selection
}

fn info_replies(
    opts: &Options<'_>,
    name: &str,
    backend: &dyn ExportBackend,
    requests: &[u16],
) -> Vec<InfoReply> {
    let mut out = vec![InfoReply::Export {
        size: backend.size(),
        flags: opts.transmission_flags(backend),
    }];
    if requests.contains(&INFO_NAME) {
        out.push(InfoReply::Name(name.to_owned()));
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let description = opts
            .shared
            .source
            .list(opts.peer())
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .unwrap_or_default();
        if !description.is_empty() {
            out.push(InfoReply::Description(description));
        }
    }
    // Sent even unasked: a minimum of 1 constrains nothing and tells the limits.
    let sizes = BlockSizes::new(
        backend.preferred_block_size(),
        opts.shared.config.max_request_bytes,
    );
    out.push(InfoReply::BlockSize {
        minimum: sizes.minimum,
        preferred: sizes.preferred,
        maximum: sizes.maximum,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selected(set: bool, queries: &[&str], offered: &[&str]) -> Vec<(u32, String)> {
        let queries: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
        let offered: Vec<String> = offered.iter().map(|o| o.to_string()).collect();
        select_contexts(set, &queries, &offered).contexts
    }

    fn named(pairs: &[(u32, &str)]) -> Vec<(u32, String)> {
        pairs.iter().map(|&(id, n)| (id, n.to_owned())).collect()
    }

    #[test]
    fn list_takes_namespaces_and_prefixes_set_takes_exact_names() {
        let offered = ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"];
        let all = named(&[
            (BASE_ALLOCATION_ID, META_BASE_ALLOCATION),
            (0, "qemu:dirty-bitmap:a"),
            (0, "qemu:dirty-bitmap:b"),
        ]);
        assert_eq!(selected(false, &[], &offered), all);
        assert_eq!(selected(false, &["qemu:"], &offered), all[1..]);
        assert_eq!(selected(false, &["qemu"], &offered), all[1..]);
        assert_eq!(selected(false, &["qemu:dirty-bitmap:"], &offered), all[1..]);
        assert_eq!(selected(false, &["base:", "base"], &offered), all[..1]);
        for nothing in ["qemu:dirty-bit", "qemu:dirty-bitmap:c", "", ":", "x-other:"] {
            assert_eq!(selected(false, &[nothing], &offered), [], "{nothing:?}");
        }

        // SET: nothing for no queries, exact names only, each once, ids after base's.
        assert_eq!(selected(true, &[], &offered), []);
        assert_eq!(selected(true, &["qemu:", "base:"], &offered), []);
        assert_eq!(
            selected(
                true,
                &[
                    "qemu:dirty-bitmap:b",
                    META_BASE_ALLOCATION,
                    "qemu:dirty-bitmap:b"
                ],
                &offered
            ),
            named(&[
                (BASE_ALLOCATION_ID, META_BASE_ALLOCATION),
                (BASE_ALLOCATION_ID + 1, "qemu:dirty-bitmap:b"),
            ])
        );
        let both = ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"];
        let s = select_contexts(true, &both.map(String::from), &offered.map(String::from));
        assert!(!s.base_allocation);
        let ids: Vec<u32> = s.contexts.iter().map(|c| c.0).collect();
        assert_eq!(ids, [BASE_ALLOCATION_ID + 1, BASE_ALLOCATION_ID + 2]);
    }
}
