#!/usr/bin/perl

# Tests for sni_guard: the check runs on every handshake, resumed sessions
# included, with the server name of the new ClientHello - a session made for a
# registered name does not let another name in, and a name that is no longer
# registered cannot come back through a session.

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

my $t = Test::Nginx->new()->has(qw/http http_ssl socket_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_protocols       TLSv1.2 TLSv1.3;
    ssl_session_cache   shared:SSL:1m;
    ssl_session_tickets on;

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_valid 1s;

    # expired answers are not used while they are refreshed: the withdrawn
    # registrations below take effect at once
    sni_guard_stale 0;

    server {
        listen       127.0.0.1:8443 ssl default_server;
        server_name  _;
        sni_guard    on;
        return 200  "guarded $ssl_session_reused";
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  admin.example.com;
        return 200  "admin $ssl_session_reused";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop12.example.com', 'shop13.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(14)->run();

###############################################################################

my $port = port(8443);
my %session;

for my $version ('TLSv1_2', 'TLSv1_3') {
	my ($v) = $version =~ /(\d)$/;
	my $name = "shop1$v.example.com";

	my $r = tls_get($port, $name, version => $version);
	is($r->{body}, 'guarded .', "$version: registered name, full handshake");
	$session{$v} = $r->{session};

	$r = tls_get($port, $name, session => $session{$v});
	is($r->{body}, 'guarded r', "$version: registered name, resumed");

	$r = tls_get($port, "evil1$v.example.net", session => $session{$v});
	like($r->{error}, qr/alert internal error/,
		"$version: session of a registered name, unregistered name: refused");
	is(lookup_count($d, "evil1$v.example.net"), 1,
		"$version: the new name was looked up");

	$r = tls_get($port, 'admin.example.com', version => $version);
	$r = tls_get($port, "evil2$v.example.net", session => $r->{session});
	like($r->{error}, qr/alert internal error/,
		"$version: session of an unguarded server, unregistered name: refused");
}

# the registrations are withdrawn; once the cached answers expire, the names'
# own sessions are refused

lookup_conf($d, registered => []);
select undef, undef, undef, 1.5;

for my $v (2, 3) {
	my $r = tls_get($port, "shop1$v.example.com", session => $session{$v});
	like($r->{error}, qr/alert internal error/,
		"TLSv1_$v: name no longer registered: its session is refused");
}

like($t->read_file('error.log'),
	qr/sni_guard refused "shop12.example.com": not registered/,
	'refusal of a resumed session logged');
is(scalar(grep { /shop1/ } lookups($d)), 4, 'two lookups for each registered name');

###############################################################################
