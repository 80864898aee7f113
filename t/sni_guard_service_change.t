#!/usr/bin/perl

# Tests for sni_guard: a reload that changes a zone's lookup service keeps the
# zone, but its answers are asked again - "registered" ones stale, so that the
# names keep working meanwhile.

###############################################################################

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard        on;
    sni_guard_zone   guard:1m;
    sni_guard_lookup http://@HOST@:%%PORT_8081%%/check;

    server {
        listen       127.0.0.1:8443 ssl;
        return 200 "ok";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

(my $first = $conf) =~ s/\@HOST\@/127.0.0.1/;
$t->write_file_expand('nginx.conf', $first);
$t->plan(6)->run();

###############################################################################

my $port = port(8443);

tls_get($port, 'shop.example.com');
tls_get($port, 'nope.example.com');

# The same service, spelled otherwise: the module cannot know it is the same.

(my $second = $conf) =~ s/\@HOST\@/localhost/;
$t->write_file_expand('nginx.conf', $second);
$t->reload();

my $notice = qr/sni_guard zone "guard" now caches another lookup service, 2 answers to be looked up again/;
for (1 .. 50) {
	last if $t->read_file('error.log') =~ $notice;
	select undef, undef, undef, 0.1;
}
like($t->read_file('error.log'), $notice, 'the change is logged at notice');

# let the old worker go
select undef, undef, undef, 0.5;

is(tls_get($port, 'shop.example.com')->{body}, 'ok',
	'registered name: served at once, from its stale answer');
for (1 .. 30) {
	last if lookup_count($d, 'shop.example.com') >= 2;
	select undef, undef, undef, 0.1;
}
is(lookup_count($d, 'shop.example.com'), 2, 'registered name: asked again in the background');

like(tls_get($port, 'nope.example.com')->{error}, qr/alert internal error/,
	'unregistered name: refused');
is(lookup_count($d, 'nope.example.com'), 2, 'unregistered name: asked again on the handshake');

tls_get($port, 'shop.example.com');
is(lookup_count($d, 'shop.example.com'), 2, 'refreshed answer cached again');

###############################################################################
