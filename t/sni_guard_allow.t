#!/usr/bin/perl

# Tests for sni_guard: names on sni_guard_allow pass without a lookup; `*.suffix`
# wildcards match whole labels only.

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

    sni_guard       on;
    sni_guard_zone  guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_allow status.platform.example *.alpha.example;
    sni_guard_allow Infra.Platform.Example.;

    server {
        listen       127.0.0.1:8443 ssl;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        sni_guard_allow *.beta.example;
        return 200  "ok";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => []);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(12)->run();

###############################################################################

my ($http_level, $own) = (port(8443), port(8444));

# "<outcome>, <lookups>" for a handshake.
sub try {
	my ($port, $name) = @_;
	my $before = scalar lookups($d);
	my $r = client_hello($port, sni => $name);
	my $what = $r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome};
	return "$what, " . (scalar(lookups($d)) - $before) . " lookups";
}

is(try($http_level, 'status.platform.example'), 'handshake, 0 lookups', 'exact name');
is(try($http_level, 'STATUS.platform.example.'), 'handshake, 0 lookups',
	'exact name, other spelling');
is(try($http_level, 'infra.platform.example'), 'handshake, 0 lookups',
	'entries are normalised; directives add up');
is(try($http_level, 'x.status.platform.example'), 'alert 80, 1 lookups',
	'an exact name has no subdomains');

is(try($http_level, 'x.alpha.example'), 'handshake, 0 lookups', 'wildcard, one label');
is(try($http_level, 'a.b.alpha.example'), 'handshake, 0 lookups', 'wildcard, two labels');
is(try($http_level, 'alpha.example'), 'alert 80, 1 lookups', 'wildcard: not the name itself');
is(try($http_level, 'x.gw-alpha.example'), 'alert 80, 1 lookups',
	'wildcard: a label that only ends like the suffix');
is(try($http_level, 'x_y.alpha.example'), 'alert 80, 0 lookups',
	'wildcard: invalid names are refused all the same');

is(try($own, 'x.beta.example'), 'handshake, 0 lookups', 'own list of a server');
is(try($own, 'x.alpha.example'), 'alert 80, 1 lookups',
	'a server\'s own list replaces the inherited one');

like($t->read_file('error.log'), qr/sni_guard refused "alpha.example": not registered/,
	'names off the list are checked as usual');

###############################################################################
