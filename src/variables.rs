//! `$sni_guard_result`: how the guard decided on the connection's handshake, for access logs.

use nginx_sys::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_http_variable_value_t, ngx_int_t,
    ngx_str_t, NGX_HTTP_VAR_NOCACHEABLE,
};
use ngx::core::Status;
use sni_guard_core::shared::Decision;

use crate::hook;

/// Registers the variables; runs as the module's preconfiguration handler.
pub unsafe extern "C" fn add(cf: *mut ngx_conf_t) -> ngx_int_t {
    let name = "sni_guard_result";
    let mut name = ngx_str_t { len: name.len(), data: name.as_ptr().cast_mut() };

    // SAFETY: nginx copies the name; the handler is a plain function.
    let var = unsafe { ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as _) };
    let Some(var) = (unsafe { var.as_mut() }) else {
        return Status::NGX_ERROR.into();
    };
    var.get_handler = Some(result);

    Status::NGX_OK.into()
}

/// `allow_list`, `cache`, `stale`, `lookup`, `no_sni` or `on_error` on a connection whose
/// handshake the guard allowed; not found where the guard is off or on plain connections.
unsafe extern "C" fn result(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    _data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes the request and the value to fill in.
    let (r, v) = unsafe { (&*r, &mut *v) };

    // SAFETY: a request always has its connection; `ssl` is set on TLS connections only.
    let ssl = unsafe { (*r.connection).ssl.as_ref() }.map(|s| s.connection);

    match ssl.and_then(hook::decision) {
        Some(Decision::Allow(how)) => {
            let text = how.as_str();
            v.data = text.as_ptr().cast_mut();
            v.set_len(text.len() as _);
            v.set_valid(1);
            v.set_no_cacheable(0);
            v.set_not_found(0);
        }
        _ => v.set_not_found(1),
    }

    Status::NGX_OK.into()
}
