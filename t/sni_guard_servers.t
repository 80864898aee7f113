#!/usr/bin/perl

# Tests for sni_guard: the settings that apply to a handshake are those of the
# server block nginx selects for its server name - exact, wildcard and regex
# server_name, else the default server of the address.

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

my $t = Test::Nginx->new()->has(qw/http http_ssl rewrite/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    # a catch-all server for customer domains, beside the platform's own hosts

    server {
        listen       127.0.0.1:8443 ssl default_server;
        server_name  _;
        sni_guard    on;
        return 200  "default";
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  admin.example.com;
        sni_guard    off;
        return 200  "admin";
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  *.internal.example;
        return 200  "internal";
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  ~^static\d+\.example\.net$;
        return 200  "static";
    }

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  shop.example.com;
        sni_guard    on;
        return 200  "shop";
    }

    # an open default server, with one guarded name on the same address

    server {
        listen       127.0.0.1:8444 ssl default_server;
        server_name  _;
        return 200  "open";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        server_name  guarded.example.org;
        sni_guard    on;
        return 200  "guarded";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com', 'customer.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(20)->run();

###############################################################################

my ($guarded, $open) = (port(8443), port(8444));

# Does one handshake and request; returns "<body or refusal>, <lookups it caused>".
sub get {
	my ($port, $name) = @_;
	my $before = scalar lookups($d);
	my $r = tls_get($port, $name);
	my $what = $r->{ok} ? $r->{body}
		: $r->{error} =~ /alert internal error/ ? 'refused' : "error: $r->{error}";
	return "$what, " . (scalar(lookups($d)) - $before) . " lookups";
}

# The same through the raw probe, for names a TLS client will not send.
sub hello {
	my ($port, $sni) = @_;
	my $before = scalar lookups($d);
	my $r = client_hello($port, defined $sni ? (sni => $sni) : (neither => 1));
	my $what = $r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome};
	return "$what, " . (scalar(lookups($d)) - $before) . " lookups";
}

# guarded default server

is(get($guarded, 'customer.example.com'), 'default, 1 lookups',
	'default server: registered name looked up and served');
is(get($guarded, 'unknown.example.com'), 'refused, 1 lookups',
	'default server: unregistered name refused');
is(hello($guarded, '52.57.163.17'), 'alert 80, 0 lookups',
	'default server: IP literal refused');

is(get($guarded, 'admin.example.com'), 'admin, 0 lookups',
	'exact name with the guard off: no lookup');
is(hello($guarded, 'ADMIN.Example.COM.'), 'handshake, 0 lookups',
	'exact name, other spelling: same server, no lookup');

is(get($guarded, 'a.internal.example'), 'internal, 0 lookups',
	'wildcard name, guard inherited off: no lookup');
is(get($guarded, 'deep.a.internal.example'), 'internal, 0 lookups',
	'wildcard name, deeper: no lookup');
is(get($guarded, 'internal.example.com'), 'refused, 1 lookups',
	'name that only resembles the wildcard: checked');

is(get($guarded, 'static12.example.net'), 'static, 0 lookups',
	'regex name: no lookup');
is(get($guarded, 'static.example.net'), 'refused, 1 lookups',
	'name the regex does not match: checked');

is(get($guarded, 'shop.example.com'), 'shop, 1 lookups',
	'exact name with the guard on: looked up');
is(get($guarded, 'shop.example.com'), 'shop, 0 lookups',
	'exact name with the guard on: then cached');

# open default server

is(get($open, 'anything.example'), 'open, 0 lookups',
	'open default server: no lookup');
is(hello($open, 'bad_name.example'), 'handshake, 0 lookups',
	'open default server: no name rules either');
is(hello($open, '52.57.163.17'), 'handshake, 0 lookups',
	'open default server: IP literal passes');
is(hello($open, undef), 'handshake, 0 lookups',
	'open default server: no server name passes');

is(get($open, 'guarded.example.org'), 'refused, 1 lookups',
	'guarded name on an open address: checked');
is(hello($open, 'Guarded.Example.ORG'), 'alert 80, 0 lookups',
	'guarded name, other spelling: answered from the cache');

lookup_conf($d, registered => [ 'shop.example.com', 'customer.example.com',
	'guarded.example.org' ]);

is(hello($open, 'guarded.example.org'), 'alert 80, 0 lookups',
	'guarded name registered since: still refused while cached');
like($t->read_file('error.log'), qr/sni_guard refused "guarded.example.org"/,
	'refusal on the named server logged');

###############################################################################
