#!/usr/bin/perl

# Tests for sni_guard: behind a load balancer that speaks the PROXY protocol,
# a client's share of the lookup budget (per_client) is that of the address the
# header gives, not the balancer's.

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

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard on;
    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_lookup_rate 100r/s burst=10 per_client=1r/m;

    server {
        listen       127.0.0.1:8443 ssl proxy_protocol;
        return 200  "ok";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ map { "p$_.example.com" } 1 .. 8 ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(3)->run();

###############################################################################

sub hello_from {
	my ($addr, $name) = @_;
	my $r = client_hello(port(8443), sni => $name,
		proxy => "PROXY TCP4 $addr 127.0.0.1 40000 443\r\n");
	return $r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome};
}

# each client one lookup a minute, whatever the balancer's address

my @outcomes = map { hello_from("203.0.113.$_", "p$_.example.com") } 1 .. 6;
is("@outcomes", join(' ', ('handshake') x 6),
	'six clients behind one balancer: each new name looked up');

# the first client's share, its burst of one included, runs out

@outcomes = map { hello_from('203.0.113.1', "p$_.example.com") } 7 .. 8;
is("@outcomes", 'handshake alert 80', 'a client over its share: refused');
like($t->read_file('error.log'),
	qr/sni_guard refused "p8\.example\.com": over the lookup budget/,
	'refused for the budget');

###############################################################################
