#!/usr/bin/perl

# Tests for sni_guard: the lookup contract and lookup errors.  A name is looked
# up with GET URL?domain=NAME (&domain= when the URL has a query); 2xx means
# registered, 403/404/410 not registered, and both are cached.  Anything else
# (other statuses, redirects, a service that is down, hangs, breaks HTTP or
# sends too much) is a lookup error: the handshake is refused with
# internal_error (80), the error is logged, and nothing is cached.  A JSON body
# may set the cache time of one answer.  The service may be https, with its
# own trusted CA, and connections to it are kept alive.

###############################################################################

use warnings;
use strict;

use Test::More;

use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw/ time sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

eval { require IO::Socket::SSL; };
plan(skip_all => 'IO::Socket::SSL not installed') if $@;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard on;

    # the main lookup service: the contract, answers, JSON, keep-alive
    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        sni_guard_zone   main:1m;
        sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a lookup URL that already has a query
    server {
        listen       127.0.0.1:8444 ssl;
        server_name  localhost;

        sni_guard_zone   query:1m;
        sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check?token=abc;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a service whose behaviour changes: lookup errors
    server {
        listen       127.0.0.1:8445 ssl;
        server_name  localhost;

        sni_guard_zone    errors:1m;
        sni_guard_lookup  http://127.0.0.1:%%PORT_8082%%/check;
        sni_guard_timeout 300ms;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a service that is down until the test starts it
    server {
        listen       127.0.0.1:8446 ssl;
        server_name  localhost;

        sni_guard_zone   down:1m;
        sni_guard_lookup http://127.0.0.1:%%PORT_8084%%/check;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # https, trusting the test CA
    server {
        listen       127.0.0.1:8447 ssl;
        server_name  localhost;

        sni_guard_zone   https:1m;
        sni_guard_lookup https://localhost:%%PORT_8083%%/check;
        sni_guard_lookup_trusted_certificate ca.crt;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # https with the default roots, which do not trust the test CA
    server {
        listen       127.0.0.1:8448 ssl;
        server_name  localhost;

        sni_guard_zone   https_untrusted:1m;
        sni_guard_lookup https://localhost:%%PORT_8083%%/check;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # https, trusted CA, but the certificate is for localhost, not 127.0.0.1
    server {
        listen       127.0.0.1:8449 ssl;
        server_name  localhost;

        sni_guard_zone   https_ip:1m;
        sni_guard_lookup https://127.0.0.1:%%PORT_8083%%/check;
        sni_guard_lookup_trusted_certificate ca.crt;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a service that redirects to the main one
    server {
        listen       127.0.0.1:8450 ssl;
        server_name  localhost;

        sni_guard_zone   redirect:1m;
        sni_guard_lookup http://127.0.0.1:%%PORT_8085%%/check;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
my ($main, $errors, $tls, $down) = map { "$d/$_" } qw/ main errors tls down /;
mkdir $_ or die "Can't create $_: $!" for $main, $errors, $tls, $down;

make_cert($d, 'localhost');

lookup_conf($main,
	registered => [ qw/ norm.example.com query.example
		s200.example redirect.example /, map { "ka$_.example" } 1 .. 5 ],
	status => { 's204.example' => 204, 's404.example' => 404,
		's403.example' => 403, 's410.example' => 410 },
	json => { 'ttl0.example' => '{"ttl": 0}', 'ttl1.example' => '{"ttl": 1}',
		'badjson.example' => '{"ttl": ' });
lookup_conf($errors);
lookup_conf($tls, registered => [ qw/ tls-ok.example tls-untrusted.example
	tls-ip.example /, map { "tls-ka$_.example" } 1 .. 5 ]);

$t->run_daemon(\&lookup_daemon, port(8081), $main);
$t->run_daemon(\&lookup_daemon, port(8082), $errors);
$t->run_daemon(\&lookup_daemon, port(8083), $tls,
	tls => { cert => "$d/localhost.crt", key => "$d/localhost.key" });
$t->run_daemon(\&redirector, port(8085), $d, port(8081));

for my $ready ("$main/lookup.pid", "$errors/lookup.pid", "$tls/lookup.pid",
	"$d/redirect.ready")
{
	$t->waitforfile($ready) or die "lookup service did not start: $ready";
}

$t->plan(72)->run();

###############################################################################

# One raw ClientHello: 'handshake', 'alert N', or what else happened.
sub hello {
	my ($port, $name) = @_;
	my $r = client_hello($port, sni => $name);
	return $r->{outcome} eq 'alert' ? "alert $r->{alert}" : $r->{outcome};
}

sub new_lookups {
	my ($dir, $name, $code) = @_;
	my $before = lookup_count($dir, $name);
	my @result = $code->();
	return (lookup_count($dir, $name) - $before, @result);
}

# Read without $t: a named sub that holds $t keeps it alive until global
# destruction, too late for the harness's closing checks.
sub error_log {
	open my $fh, '<', "$d/error.log" or die "Can't open $d/error.log: $!";
	local $/;
	return <$fh> // '';
}

# The cause of the warn line for a failed lookup of $url, undef when none.
sub warned {
	my ($url) = @_;
	my ($cause) = error_log()
		=~ /\[warn\] .*sni_guard lookup "\Q$url\E" failed: (.*?)(?: while |, client: |$)/m;
	return $cause;
}

# The lookups of @names went over fewer connections than lookups, counted both
# as connections the service accepted since $conns and as the distinct
# connection processes that logged them.
sub check_shared {
	my ($what, $dir, $conns, @names) = @_;
	my %want = map { $_ => 1 } @names;
	my %pids = map { $_->{pid} => 1 }
		grep { defined $_->{domain} && $want{$_->{domain}} } lookup_log($dir);
	my $carried = keys %pids;
	my $accepted = lookup_conns($dir) - $conns;
	ok($carried < @names && $accepted < @names,
		"$what: " . @names . " lookups over $carried connection(s),"
		. " $accepted newly accepted");
}

sub check_error_logged {
	my ($what, $url, $name, $cause) = @_;
	my $logged = warned($url);
	like($logged // 'no such warn line', $cause,
		"$what: lookup error at warn with the URL and the cause ("
		. ($logged // 'none') . ')');
	like(error_log(), qr/\[info\] .*sni_guard refused "\Q$name\E": lookup error/,
		"$what: refusal at info");
}

sub check_not_cached {
	my ($what, $port, $dir, $name) = @_;
	my ($n, $outcome) = new_lookups($dir, $name, sub { hello($port, $name) });
	is("$outcome, $n lookup", 'handshake, 1 lookup',
		"$what: not cached, once fixed the next handshake looks up and completes");
}

###############################################################################

# the request

my $r = tls_get(port(8443), 'Norm.Example.COM.');
is(join(' ', $r->{ok} ? 'completed' : 'failed', lookups($main)),
	'completed /check?domain=norm.example.com',
	'request: GET /check?domain=NAME with the normalised name');

is(hello(port(8444), 'query.example') . ', ' . join(' ', grep { /query/ } lookups($main)),
	'handshake, /check?token=abc&domain=query.example',
	'request: URL with a query: ?token=abc&domain=NAME');

is(hello(port(8450), 'redirect.example') . ', ' . $t->read_file('redirect.log'),
	"alert 80, GET /check?domain=redirect.example HTTP/1.1\n",
	'request: method GET, HTTP/1.1 request line');

is(lookup_count($main, 'redirect.example'), 0,
	'redirect: not followed (the Location, where the name is registered, got no request)');

# answers: registered and not registered, both cached

for my $case ([ 's200.example', 200 ], [ 's204.example', 204 ]) {
	my ($name, $status) = @$case;
	my ($n, $g) = new_lookups($main, $name, sub { tls_get(port(8443), $name) });
	is(($g->{body} // 'no page: ' . ($g->{error} // '')) . ", $n lookup",
		"name $name, 1 lookup", "$status: registered, page served");

	($n, $g) = new_lookups($main, $name, sub { tls_get(port(8443), $name) });
	is(($g->{ok} ? 'completed' : 'failed') . ", $n lookups", 'completed, 0 lookups',
		"$status: cached, second handshake makes no lookup");
}

for my $case ([ 's404.example', 404 ], [ 's403.example', 403 ], [ 's410.example', 410 ]) {
	my ($name, $status) = @$case;
	my ($n, $outcome) = new_lookups($main, $name, sub { hello(port(8443), $name) });
	is("$outcome, $n lookup", 'alert 80, 1 lookup',
		"$status: not registered, refused with internal_error");

	($n, $outcome) = new_lookups($main, $name, sub { hello(port(8443), $name) });
	is("$outcome, $n lookups", 'alert 80, 0 lookups',
		"$status: cached, second handshake makes no lookup");
}

# lookup errors: refused, logged, not cached

my $eurl = 'http://127.0.0.1:' . port(8082) . '/check';
my @errors = (
	[ 'status 500', 'e500.example', 'status 500', qr/500/ ],
	[ 'status 503', 'e503.example', 'status 503', qr/503/ ],
	[ '302 redirect', 'e302.example', 'redirect', qr/redirect.*302|302.*redirect/i ],
	[ 'hang, timeout 300ms', 'hang.example', 'hang', qr/timed out|timeout/i ],
	[ 'close before the reply', 'close.example', 'close', qr/clos|eof/i ],
	[ 'partial body', 'partial.example', 'partial', qr/clos|eof|incomplete/i ],
	[ 'malformed status line', 'malformed.example', 'malformed', qr/malformed/i ],
	[ 'endless body', 'endless.example', 'endless', qr/too large/i ],
	[ 'reset', 'reset.example', 'reset', qr/reset/i ],
);

for my $case (@errors) {
	my ($what, $name, $mode, $cause) = @$case;

	lookup_conf($errors, mode => $mode, registered => [ $name ]);
	my $start = time();
	my $outcome = hello(port(8445), $name);
	my $took = time() - $start;
	lookup_conf($errors, registered => [ $name ]);

	is($outcome, 'alert 80', "$what: refused with internal_error");
	if ($mode eq 'hang') {
		ok($took < 3, sprintf('%s: handshake ended after %.2f s', $what, $took));
	}
	check_error_logged($what, "$eurl?domain=$name", $name, $cause);
	check_not_cached($what, port(8445), $errors, $name);
}

# the service is down, then started
{
	my $what = 'service down';
	my $name = 'down.example';
	is(hello(port(8446), $name), 'alert 80', "$what: refused with internal_error");
	check_error_logged($what, 'http://127.0.0.1:' . port(8084) . "/check?domain=$name",
		$name, qr/refused/i);

	lookup_conf($down, registered => [ $name ]);
	$t->run_daemon(\&lookup_daemon, port(8084), $down);
	$t->waitforfile("$down/lookup.pid") or die 'late lookup service did not start';
	check_not_cached($what, port(8446), $down, $name);
}

# JSON answers

{
	my ($n, @outcomes) = new_lookups($main, 'ttl0.example',
		sub { map { hello(port(8443), 'ttl0.example') } 1 .. 3 });
	is("@outcomes, $n lookups", 'handshake handshake handshake, 3 lookups',
		'json ttl 0: never cached, every handshake looks up');

	($n, @outcomes) = new_lookups($main, 'ttl1.example',
		sub { map { hello(port(8443), 'ttl1.example') } 1 .. 2 });
	is("@outcomes, $n lookup", 'handshake handshake, 1 lookup',
		'json ttl 1: second handshake right away answered from the cache');

	# Expired, the answer is still used (sni_guard_stale) while it is
	# refreshed in the background: the lookup follows the handshake.
	select undef, undef, undef, 1.5;
	my $before = lookup_count($main, 'ttl1.example');
	my $outcome = hello(port(8443), 'ttl1.example');
	for (1 .. 30) {
		last if lookup_count($main, 'ttl1.example') > $before;
		select undef, undef, undef, 0.1;
	}
	is("$outcome, " . (lookup_count($main, 'ttl1.example') - $before) . " lookup",
		'handshake, 1 lookup', 'json ttl 1: after 1.5 s looked up again');

	($n, @outcomes) = new_lookups($main, 'badjson.example',
		sub { hello(port(8443), 'badjson.example') });
	is("@outcomes, $n lookup", 'alert 80, 1 lookup',
		'json malformed, application/json: lookup error, refused');
	my $url = 'http://127.0.0.1:' . port(8081) . '/check?domain=badjson.example';
	like(warned($url) // 'no such warn line', qr/json/i,
		'json malformed: logged at warn as a lookup error');
}

# keep-alive over http

{
	my $conns = lookup_conns($main);
	my @outcomes = map { hello(port(8443), "ka$_.example") } 1 .. 5;
	my $lookups = grep { lookup_count($main, "ka$_.example") == 1 } 1 .. 5;
	is("@outcomes, $lookups names looked up",
		join(' ', ('handshake') x 5) . ', 5 names looked up',
		'http keep-alive: five names, five lookups');
	check_shared('http keep-alive', $main, $conns, map { "ka$_.example" } 1 .. 5);
}

# https

{
	my $g = tls_get(port(8447), 'tls-ok.example');
	is($g->{body} // 'no page: ' . ($g->{error} // ''), 'name tls-ok.example',
		'https, test CA trusted: registered name completes');
	is(lookup_count($tls, 'tls-ok.example'), 1, 'https: the service got the lookup');

	my $conns = lookup_conns($tls);
	my @outcomes = map { hello(port(8447), "tls-ka$_.example") } 1 .. 5;
	my $lookups = grep { lookup_count($tls, "tls-ka$_.example") == 1 } 1 .. 5;
	is("@outcomes, $lookups names looked up",
		join(' ', ('handshake') x 5) . ', 5 names looked up',
		'https keep-alive: five names, five lookups');
	check_shared('https keep-alive', $tls, $conns, map { "tls-ka$_.example" } 1 .. 5);

	my $port = port(8083);
	for my $case (
		[ 'https, default roots', port(8448), 'tls-untrusted.example',
			"https://localhost:$port/check" ],
		[ 'https, URL host not in the certificate', port(8449), 'tls-ip.example',
			"https://127.0.0.1:$port/check" ],
	) {
		my ($what, $nport, $name, $url) = @$case;
		is(hello($nport, $name), 'alert 80', "$what: lookup error, refused");
		my $logged = warned("$url?domain=$name");
		like($logged // 'no such warn line', qr/tls|certificate/i,
			"$what: logged at warn with the URL and the cause ("
			. ($logged // 'none') . ')');
		is(lookup_count($tls, $name), 0, "$what: no request reached the service");
	}
}

###############################################################################

# A lookup service that answers every request with a 302 to the main service,
# where the name is registered, and logs each request line: a client that
# followed the redirect would show up in the main service's log.  Sequential,
# one request per connection; it ends when the test does, or after 2 minutes.
sub redirector {
	my ($port, $dir, $to) = @_;
	my $parent = getppid();
	my $log = "$dir/redirect.log";

	my $server = IO::Socket::INET->new(
		LocalAddr => "127.0.0.1:$port", Listen => 5, ReuseAddr => 1,
	) or die "Can't listen on 127.0.0.1:$port: $@\n";
	open my $ready, '>', "$dir/redirect.ready" or die "Can't create $dir/redirect.ready: $!\n";
	close $ready;

	my $sel = IO::Select->new($server);
	my $end = time() + 120;
	while (time() < $end && getppid() == $parent) {
		next unless $sel->can_read(0.2);
		my $c = $server->accept() or next;

		my $head = '';
		my $in = IO::Select->new($c);
		my $deadline = time() + 2;
		while (index($head, "\r\n\r\n") < 0) {
			my $left = $deadline - time();
			last if $left <= 0 || !$in->can_read($left);
			last unless sysread($c, $head, 4096, length $head);
		}
		my ($line) = split /\r\n/, $head;
		$line //= '';
		my ($query) = $line =~ m{^\S+ [^?\s]*(\?\S*)};

		open my $fh, '>>', $log or die "Can't open $log: $!\n";
		print $fh "$line\n";
		close $fh;

		local $SIG{PIPE} = 'IGNORE';
		syswrite($c, "HTTP/1.1 302 Found\r\n"
			. "Location: http://127.0.0.1:$to/check" . ($query // '') . "\r\n"
			. "Content-Length: 0\r\nConnection: close\r\n\r\n");
		close $c;
	}
}

###############################################################################
