(function(){
  var rows=Array.prototype.slice.call(document.querySelectorAll('tr.q'));
  var buttons=Array.prototype.slice.call(document.querySelectorAll('button[data-filter]'));
  var text=document.getElementById('text-filter');
  var count=document.getElementById('visible-count');
  var current='all';
  function apply(){
    var q=text.value.trim().toLowerCase(), n=0;
    rows.forEach(function(r){
      var tags=r.getAttribute('data-tags').split(' ');
      var ok=(current==='all'||tags.indexOf(current)>=0)&&(!q||r.getAttribute('data-search').indexOf(q)>=0);
      r.hidden=!ok; if(ok){n++;}
    });
    count.textContent=String(n);
    buttons.forEach(function(b){b.classList.toggle('active',b.getAttribute('data-filter')===current);});
    document.body.setAttribute('data-filter',current);
    var h='#filter='+current+(q?'&q='+encodeURIComponent(q):'');
    if(location.hash!==h){try{history.replaceState(null,'',h);}catch(e){}}
  }
  buttons.forEach(function(b){b.addEventListener('click',function(){current=b.getAttribute('data-filter');apply();});});
  text.addEventListener('input',apply);
  var m=/filter=([a-z]+)/.exec(location.hash), t=/[#&]q=([^&]*)/.exec(location.hash);
  if(m&&buttons.some(function(b){return b.getAttribute('data-filter')===m[1];})){current=m[1];}
  if(t){try{text.value=decodeURIComponent(t[1]);}catch(e){}}
  apply();
  document.body.setAttribute('data-ready','1');
})();
