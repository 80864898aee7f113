#!/usr/bin/perl

# Tests for sni_guard: the cache across reloads and binary upgrades.  A reload
# (HUP) with the zone unchanged keeps every cached answer and drops no
# handshake; a zone whose size changed is made anew with the old answers copied
# into it, and says so in the log.  A binary upgrade (USR2, then QUIT to the old
# master) keeps handshakes going; the new master's workers start with an empty
# cache.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX qw/ WNOHANG /;
use Time::HiRes qw/ time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

sub conf {
	my ($size) = @_;

	return <<"EOF";

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    sni_guard_zone guard:$size;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        ssl_certificate     localhost.crt;
        ssl_certificate_key localhost.key;

        sni_guard on;

        location / {
            return 200 "name \$ssl_server_name";
        }
    }
}

EOF
}

$t->write_file_expand('nginx.conf', conf('1m'));

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ map { "$_.example.com" } qw/ a b c up / ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(36)->run();

###############################################################################

my $port = port(8443);
my @registered = ('a.example.com', 'b.example.com');
my @unregistered = ('x.example.com', 'y.example.com');

sub alive {
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/stat" or return 0;
	my $line = <$fh> // '';
	return $line =~ /.*\) Z /s ? 0 : 1;
}

# Reloads and waits until every worker that ran before is gone and the
# master runs as many new ones: the next handshake is the new workers'.
# The harness object is passed in: a named sub that refers to it keeps it
# alive past the end of the test, when nginx-tests' harness runs its last
# checks.
sub reload_and_wait {
	my ($nginx) = @_;
	my $master = pid_in("$d/nginx.pid") or return 0;
	my @before = children($master);
	my %old = map { $_ => 1 } @before;

	$nginx->reload();

	return wait_for(10, sub {
		my @now = children($master);
		return @now == @before && !grep { $old{$_} } @now;
	});
}

# Handshakes for every name; returns the outcomes, one word per name.
sub outcomes {
	my ($p, @names) = @_;
	return join ' ', map {
		my $r = tls_get($p, $_);
		($r->{body} // '') eq "name $_" ? 'served'
			: ($r->{error} // '') =~ /alert internal error/ ? 'refused'
			: 'failed: ' . ($r->{error} // $r->{reply} // '?');
	} @names;
}

my @names = (@registered, @unregistered);
my $expected = 'served served refused refused';

# a reload with the zone unchanged keeps the answers

is(outcomes($port, @names), $expected, 'before the reload: answers from the service');
is(scalar lookups($d), 4, 'before the reload: one lookup per name');

ok(reload_and_wait($t), 'reload: new workers took over');

is(outcomes($port, @names), $expected, 'after the reload: same answers');
is(scalar lookups($d), 4, 'after the reload: no new lookup, registered or not');

# a reload in the middle of traffic drops no handshake: a client handshakes
# every 20 ms, from before the reload until after the old workers are gone

my $traffic = "$d/traffic.log";
my $stop = "$d/traffic.stop";

my $main_pid = $$;
my $client = fork() // die "fork: $!";
if ($client == 0) {
	my $deadline = time() + 20;
	for my $i (1 .. 500) {
		last if -e $stop || time() > $deadline;
		my $name = $registered[$i % 2];
		my $start = time();
		my $r = eval { tls_get($port, $name) } // { error => "died: $@" };
		my $line = ($r->{body} // '') eq "name $name" ? 'ok'
			: 'failed: ' . ($r->{error} // $r->{reply} // '?');
		open my $fh, '>>', $traffic or last;
		print $fh sprintf("%.3f %.3f %s\n", $start, time(), $line);
		close $fh;
		select undef, undef, undef, 0.02;
	}
	POSIX::_exit(0);
}

sub traffic {
	open my $fh, '<', $traffic or return ();
	my @lines = <$fh>;
	return @lines;
}

wait_for(5, sub { my @l = traffic(); @l >= 10 });
my $reload_start = time();
my $reloaded = reload_and_wait($t);
my $reload_end = time();
my @before_end = traffic();
wait_for(5, sub { my @l = traffic(); @l >= @before_end + 10 });

open my $stop_fh, '>', $stop or die "Can't create $stop: $!";
close $stop_fh;
wait_for(10, sub { waitpid($client, WNOHANG) == $client })
	or kill('KILL', $client) && waitpid($client, 0);
undef $client;

my @lines = traffic();
my @failed = grep { !/ ok$/ } @lines;
my $during = grep {
	my ($from, $to) = split;
	$from <= $reload_end && $to >= $reload_start;
} @lines;

ok($reloaded, 'reload under traffic: new workers took over');
ok(@lines >= 20, 'reload under traffic: handshakes before and after the reload')
	or diag(scalar(@lines) . ' handshakes');
is(scalar @failed, 0, 'reload under traffic: every handshake completed')
	or diag(join '', @failed[0 .. ($#failed < 4 ? $#failed : 4)]);
note(sprintf('%d handshakes overlapped the reload, which took %.3f s',
	$during, $reload_end - $reload_start));
is(scalar lookups($d), 4, 'reload under traffic: no new lookup');

# a zone of another size is made anew, with the answers copied into it

$t->write_file_expand('nginx.conf', conf('2m'));
ok(reload_and_wait($t), 'zone grown: reloaded');

like($t->read_file('error.log'),
	qr/\[notice\].*sni_guard zone "guard" resized from 1048576 to 2097152 bytes, 4 of 4 entries kept/,
	'zone grown: logged with the sizes and the entries kept');
is(outcomes($port, @names), $expected, 'zone grown: same answers');
is(scalar lookups($d), 4, 'zone grown: no new lookup for the kept entries');

is(outcomes($port, 'c.example.com', 'c.example.com'), 'served served',
	'zone grown: a new name is served');
is(lookup_count($d, 'c.example.com'), 1, 'zone grown: the new name is cached');

$t->write_file_expand('nginx.conf', conf('64k'));
ok(reload_and_wait($t), 'zone shrunk: reloaded');

like($t->read_file('error.log'),
	qr/\[notice\].*sni_guard zone "guard" resized from 2097152 to 65536 bytes, 5 of 5 entries kept/,
	'zone shrunk: logged with the sizes and the entries kept');
is(outcomes($port, @names, 'c.example.com'), "$expected served", 'zone shrunk: same answers');
is(scalar lookups($d), 5, 'zone shrunk: no new lookup for the kept entries');

# shrunk below what it holds: the oldest answers give way, and the line says
# how many were kept

$t->write_file_expand('nginx.conf', conf('1m'));
ok(reload_and_wait($t), 'zone grown again: reloaded');
my @many = map { "many-$_.example.com" } 1 .. 600;
my $refused = grep { client_hello($port, sni => $_)->{outcome} eq 'alert' } @many;
is($refused, 600, 'zone grown again: 600 invented names refused, and cached');

$t->write_file_expand('nginx.conf', conf('64k'));
ok(reload_and_wait($t), 'zone shrunk below its entries: reloaded');
my ($kept, $total) = $t->read_file('error.log')
	=~ /resized from 1048576 to 65536 bytes, (\d+) of (\d+) entries kept/;
ok(defined $kept && $total >= 605 && $kept > 100 && $kept < $total,
	'zone shrunk below its entries: logged with the entries that fit'
	. (defined $kept ? " ($kept of $total)" : ''));
is(outcomes($port, @names, 'c.example.com'), "$expected served",
	'zone shrunk below its entries: same answers');
my $before = scalar lookups($d);
client_hello($port, sni => $many[0]);
is(scalar lookups($d), $before + 1, 'zone shrunk below its entries: the oldest given way');

unlike($t->read_file('error.log'), qr/sni_guard zone .* emptied/,
	'no zone was emptied on the way');

###############################################################################

# Binary upgrade.  A master ignores USR2 ("signal 12 (SIGUSR2) received ...,
# ignoring") while its parent is still the process that started it: that is
# how a new master knows that its old master still runs.  The harness starts
# nginx as this script's own child, with "daemon off", so that master cannot
# be upgraded: a second instance is started here as a daemon, on port 8444
# with a zone of its own.  This script makes itself a child subreaper first,
# so that the daemon master, and the new master once the old one is gone, are
# reparented to it and can be waited for; each is stopped by its pid.

my $up = "$d/up";
mkdir $up or die "Can't create $up: $!";
my $up_port = port(8444);

$t->write_file('up/nginx.conf', <<"EOF");

pid $up/nginx.pid;
error_log $d/error.log info;
@{[ $ENV{TEST_NGINX_GLOBALS} // '' ]}

events {
}

http {
    access_log off;

    sni_guard_zone upgrade:1m;
    sni_guard_lookup http://127.0.0.1:@{[ port(8081) ]}/check;

    server {
        listen       127.0.0.1:$up_port ssl;
        server_name  localhost;

        ssl_certificate     $d/localhost.crt;
        ssl_certificate_key $d/localhost.key;

        sni_guard on;

        location / {
            return 200 "name \$ssl_server_name";
        }
    }
}

EOF

my %masters;

# Stops, by their pids, the processes this script started itself, when it
# ends before it stopped them.
END {
	if ($$ == ($main_pid // 0)) {
		local $?;
		kill('KILL', $client) && waitpid($client, 0) if $client;
		my @left = grep { alive($_) } keys %masters;
		kill 'QUIT', @left;
		for my $pid (@left) {
			wait_for(5, sub { waitpid($pid, WNOHANG); !alive($pid) })
				or kill('KILL', $pid) && waitpid($pid, 0);
		}
	}
}

sub stopped {
	my ($pid) = @_;
	return wait_for(10, sub { waitpid($pid, WNOHANG); !alive($pid) });
}

require 'syscall.ph';
syscall(SYS_prctl(), 36, 1, 0, 0, 0) == 0    # PR_SET_CHILD_SUBREAPER
	or die "Can't become a child subreaper: $!";

my $binary = $ENV{TEST_NGINX_BINARY} // '../nginx/objs/nginx';
my $starter = fork() // die "fork: $!";
if ($starter == 0) {
	open STDIN, '<', '/dev/null';
	open STDOUT, '>>', "$up/stderr.log";
	open STDERR, '>&', \*STDOUT;
	no warnings 'exec';
	exec $binary, '-p', "$up/", '-c', "$up/nginx.conf", '-e', "$d/error.log";
	POSIX::_exit(127);
}

# the starter forks the daemon master and exits
stopped($starter);
my $old = wait_for(5, sub { pid_in("$up/nginx.pid") });
$masters{$old} = 1 if $old;
my @old_workers;
wait_for(5, sub { @old_workers = children($old // 0); @old_workers });

is(outcomes($up_port, 'up.example.com', 'up.example.com'), 'served served',
	'binary upgrade: served before');
is(lookup_count($d, 'up.example.com'), 1, 'binary upgrade: looked up once before');

kill 'USR2', $old if $old;
my $new = wait_for(10, sub {
	my $pid = pid_in("$up/nginx.pid");
	return $pid && $pid != ($old // 0) && -e "$up/nginx.pid.oldbin" && children($pid) ? $pid : 0;
});
$masters{$new} = 1 if $new;

ok($new, 'USR2: a new master with workers, nginx.pid.oldbin written')
	or diag($t->read_file('error.log') =~ s/^.*\[debug\].*\n//mgr);
is(pid_in("$up/nginx.pid.oldbin"), $old, 'USR2: nginx.pid.oldbin names the old master');
is(outcomes($up_port, 'up.example.com'), 'served', 'both masters running: served');

kill 'QUIT', $old if $old;
ok($old && stopped($old), 'QUIT: the old master exited');
is(scalar(grep { alive($_) } @old_workers), 0, 'QUIT: the old workers are gone');

is(outcomes($up_port, ('up.example.com') x 3), 'served served served',
	'new master: served');
is(lookup_count($d, 'up.example.com'), 2,
	'new master: the name was looked up once more, then cached');

my @new_workers = $new ? children($new) : ();
kill 'QUIT', $new if $new;
ok($new && stopped($new) && !grep({ alive($_) } @new_workers),
	'new master and its workers stopped');

###############################################################################
