//! Tells the compiler what nginx-sys learned about the nginx this module is built against: its
//! configure-time features (`ngx_feature = "..."`) and the version-dependent code paths.

use std::env;

fn main() {
    // nginx-sys lists every feature it can report, so that unknown values are caught.
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    let known = env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".into());
    println!("cargo::rustc-check-cfg=cfg(ngx_feature, values({known}))");

    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    let features = env::var("DEP_NGINX_FEATURES").unwrap_or_default();
    let features: Vec<&str> =
        features.split(',').map(str::trim).filter(|f| !f.is_empty()).collect();
    for feature in &features {
        println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
    }

    // Stale answers are refreshed on nginx's thread pools, off the event loop.
    if !features.is_empty() && !features.contains(&"threads") {
        println!(
            "cargo::error=sni_guard needs an nginx configured --with-threads; \
             the nginx in NGINX_BUILD_DIR was not"
        );
    }

    // nginx 1.29.2 selects the virtual server in a ClientHello callback of its own, which the
    // module must call rather than replace.
    println!("cargo::rustc-check-cfg=cfg(ngx_client_hello_cb)");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    let version: u64 =
        env::var("DEP_NGINX_VERSION_NUMBER").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if version >= 1_029_002 {
        println!("cargo::rustc-cfg=ngx_client_hello_cb");
    }
}
