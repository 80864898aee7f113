//! The status page (`sni_guard_status`) and the cache purge (`sni_guard_purge`): two content
//! handlers for locations an operator protects with allow/deny or auth.

use std::ptr::NonNull;

use nginx_sys::{
    ngx_create_temp_buf, ngx_http_arg, ngx_http_discard_request_body, ngx_http_output_filter,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_pagesize, ngx_pnalloc, ngx_shm_zone_t,
    ngx_slab_pool_t, ngx_str_t, NGX_HTTP_DELETE, NGX_HTTP_GET, NGX_HTTP_HEAD,
};
use ngx::core::Status;
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf};
use sni_guard_core::names;
use sni_guard_core::query::{self, PurgeTarget};
use sni_guard_core::status::{to_json, to_prometheus, ZoneReport};

use crate::{zone, Module};

const HTTP_OK: usize = 200;
const HTTP_NO_CONTENT: usize = 204;
const HTTP_BAD_REQUEST: usize = 400;
const HTTP_NOT_FOUND: usize = 404;
const HTTP_NOT_ALLOWED: ngx_int_t = 405;

const NGX_OK: ngx_int_t = 0;
const NGX_ERROR: ngx_int_t = -1;

/// `GET`: the counters of every zone, as JSON, or in the Prometheus text format with
/// `?format=prometheus` or an `Accept` header that asks for `text/plain`.
pub unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being handled.
    let r = unsafe { &mut *r };

    if r.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
        return not_allowed(r, "GET, HEAD");
    }

    let prometheus = match arg(r, "format").as_deref() {
        Some(b"prometheus") => true,
        Some(b"json") => false,
        Some(_) => {
            let body = b"unknown format: use format=json or format=prometheus\n";
            return respond(r, HTTP_BAD_REQUEST, "text/plain", body);
        }
        None => prefers_text(r),
    };

    let Some(main) = Module::main_conf(r) else {
        return Status::NGX_ERROR.into();
    };

    let reports: Vec<ZoneReport> = main
        .zones
        .iter()
        // SAFETY: the zones belong to the configuration serving the request.
        .filter_map(|&z| report(unsafe { &*z }, r.connection_log()))
        .collect();

    if prometheus {
        respond(r, HTTP_OK, "text/plain; version=0.0.4", to_prometheus(&reports).as_bytes())
    } else {
        respond(r, HTTP_OK, "application/json", to_json(&reports).as_bytes())
    }
}

/// `DELETE ?name=NAME` removes a name from the cache (204, or 404 when it was not cached);
/// `DELETE` with no query empties it (204); any other query is a 400. The location's zone, or
/// every zone.
pub unsafe extern "C" fn purge_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being handled.
    let r = unsafe { &mut *r };

    if r.method & NGX_HTTP_DELETE as usize == 0 {
        return not_allowed(r, "DELETE");
    }

    let (Some(main), Some(lcf)) = (Module::main_conf(r), Module::location_conf(r)) else {
        return Status::NGX_ERROR.into();
    };

    let zones: Vec<&ngx_shm_zone_t> = main
        .zones
        .iter()
        // SAFETY: the zones belong to the configuration serving the request.
        .map(|&z| unsafe { &*z })
        .filter(|z| lcf.purge_zone.is_empty() || z.shm.name.as_bytes() == lcf.purge_zone.as_bytes())
        .collect();

    let log = r.connection_log();

    let name = match query::purge_target(r.args.as_bytes()) {
        Ok(PurgeTarget::All) => {
            for zone in zones {
                zone::with_zone(zone, log, |z| z.cache.clear());
            }
            return respond(r, HTTP_NO_CONTENT, "text/plain", b"");
        }
        Ok(PurgeTarget::One(name)) => {
            names::normalise(&name).map_err(|e| format!("invalid name: {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    let name = match name {
        Ok(name) => name,
        Err(e) => return respond(r, HTTP_BAD_REQUEST, "text/plain", format!("{e}\n").as_bytes()),
    };

    let removed = zones
        .into_iter()
        .filter_map(|zone| zone::with_zone(zone, log, |z| z.cache.remove(name.as_bytes())))
        .fold(false, |any, removed| any | removed);

    if removed {
        respond(r, HTTP_NO_CONTENT, "text/plain", b"")
    } else {
        respond(r, HTTP_NOT_FOUND, "text/plain", format!("\"{name}\" is not cached\n").as_bytes())
    }
}

/// Reads a zone for the report: the counters without the lock, the rest with it.
fn report(zone: &ngx_shm_zone_t, log: *mut nginx_sys::ngx_log_t) -> Option<ZoneReport> {
    let name = String::from_utf8_lossy(zone.shm.name.as_bytes());
    let mut report = ZoneReport::from_stats(&name, zone::stats(zone)?);

    zone::with_zone(zone, log, |z| {
        report.entries = z.cache.len() as u64;
        report.evictions = z.cache.evictions();
        report.breaker = z.state.breaker.state_name(crate::guard::current_msec());
        report.breaker_errors = z.state.breaker.errors();
    })?;

    report.bytes_total = zone.shm.size as u64;
    report.bytes_used = bytes_used(zone).unwrap_or(0);
    Some(report)
}

/// Bytes of the zone's slab pages in use, whole pages counted.
fn bytes_used(zone: &ngx_shm_zone_t) -> Option<u64> {
    let pool = NonNull::new(zone.shm.addr.cast::<ngx_slab_pool_t>())?;
    // SAFETY: the pool's page table is fixed at initialisation; `pfree` is a word read without
    // the lock, which at worst is a moment old.
    let (pages, free) = unsafe {
        let p = pool.as_ptr();
        ((*p).last.offset_from((*p).pages) as u64, (*p).pfree as u64)
    };
    // SAFETY: set once at process start.
    let page = unsafe { ngx_pagesize } as u64;
    Some((pages.saturating_sub(free) * page).min(zone.shm.size as u64))
}

/// Sends a complete response with the given status, type and body.
fn respond(
    r: &mut ngx_http_request_t,
    status: usize,
    content_type: &str,
    body: &[u8],
) -> ngx_int_t {
    // SAFETY: the request is alive for the handler's duration; everything below is allocated
    // from its pool, which lives as long as the response.
    unsafe {
        let rc = ngx_http_discard_request_body(r);
        if rc != NGX_OK {
            return rc;
        }

        let Some(content_type) = pool_str(r, content_type.as_bytes()) else {
            return NGX_ERROR;
        };
        r.headers_out.status = status;
        r.headers_out.content_type_len = content_type.len;
        r.headers_out.content_type = content_type;
        r.headers_out.content_length_n = body.len() as _;

        if body.is_empty() || r.method == NGX_HTTP_HEAD as usize {
            r.set_header_only(1);
        }

        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR || rc > NGX_OK || r.header_only() != 0 {
            return rc;
        }

        let b = ngx_create_temp_buf(r.pool, body.len());
        if b.is_null() {
            return NGX_ERROR;
        }
        core::ptr::copy_nonoverlapping(body.as_ptr(), (*b).pos, body.len());
        (*b).last = (*b).pos.add(body.len());
        (*b).set_last_buf(u32::from(core::ptr::eq(r, r.main)));
        (*b).set_last_in_chain(1);

        let mut out = nginx_sys::ngx_chain_t { buf: b, next: core::ptr::null_mut() };
        ngx_http_output_filter(r, &mut out)
    }
}

/// A copy of `bytes` in the request's pool.
fn pool_str(r: &ngx_http_request_t, bytes: &[u8]) -> Option<ngx_str_t> {
    // SAFETY: the pool belongs to the request.
    let data = unsafe { ngx_pnalloc(r.pool, bytes.len()) }.cast::<u8>();
    if data.is_null() {
        return None;
    }
    // SAFETY: `data` has room for `bytes`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len()) };
    Some(ngx_str_t { len: bytes.len(), data })
}

/// The value of a query argument, as sent (not decoded).
fn arg(r: &mut ngx_http_request_t, name: &str) -> Option<Vec<u8>> {
    let mut value = ngx_str_t::empty();
    // SAFETY: nginx only reads `len` bytes of the name.
    let rc = unsafe { ngx_http_arg(r, name.as_ptr().cast_mut(), name.len(), &mut value) };
    (rc == NGX_OK).then(|| value.as_bytes().to_vec())
}

/// Whether the client's Accept header prefers plain text (as Prometheus scrapers send it) to
/// JSON: a higher quality for `text/plain` than for `application/json`; JSON on a tie.
fn prefers_text(r: &ngx_http_request_t) -> bool {
    // SAFETY: the header list belongs to the request.
    let headers = unsafe { ngx::http::list_iterator(&r.headers_in.headers) };
    let accept: Vec<String> = headers
        .filter(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"accept"))
        .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .collect();
    let accept = accept.join(",");
    quality(&accept, "text/plain") > quality(&accept, "application/json")
}

/// The quality an Accept header gives a media type, by its own entry only (wildcards are taken
/// as no preference): 0 when it is absent or refused.
fn quality(accept: &str, media: &str) -> f32 {
    accept
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            (parts.next()? == media).then(|| {
                parts
                    .find_map(|p| p.strip_prefix("q="))
                    .and_then(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0)
            })
        })
        .fold(0.0, f32::max)
}

/// 405, with the methods the location does answer.
fn not_allowed(r: &mut ngx_http_request_t, allow: &str) -> ngx_int_t {
    // SAFETY: `r` is the request being handled; the header is allocated from its pool.
    let request = unsafe { ngx::http::Request::from_ngx_http_request(r) };
    if request.add_header_out("Allow", allow).is_none() {
        return NGX_ERROR;
    }
    HTTP_NOT_ALLOWED
}

/// The log of the request's connection.
trait ConnectionLog {
    fn connection_log(&self) -> *mut nginx_sys::ngx_log_t;
}

impl ConnectionLog for ngx_http_request_t {
    fn connection_log(&self) -> *mut nginx_sys::ngx_log_t {
        // SAFETY: a request always has its connection.
        unsafe { (*self.connection).log }
    }
}
