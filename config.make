# Appended to nginx's objs/Makefile by ./configure: cargo builds the module's Rust library
# against this configured tree before the module is linked. The library's rule always runs, so
# that make relinks the module whenever cargo rebuilt it; cargo decides what to rebuild.

ngx_sni_guard_src=`pwd`

cat << END                                                  >> $NGX_MAKEFILE

$NGX_OBJS/ngx_http_sni_guard_module$ngx_modext:	$ngx_sni_guard_lib

$ngx_sni_guard_lib:	sni_guard_force
	cd $ngx_addon_dir && NGINX_SOURCE_DIR=$ngx_sni_guard_src \\
	NGINX_BUILD_DIR=$ngx_sni_guard_objs CARGO_TARGET_DIR=$ngx_sni_guard_objs/sni_guard \\
	cargo rustc --release --lib --no-default-features --crate-type staticlib

.PHONY:	sni_guard_force

END
